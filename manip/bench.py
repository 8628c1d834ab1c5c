"""Speed and memory benchmark of the agents at robomimic-lift sizes (obs 19, action 7, chunks of h = 5).

    python -m manip.bench --out bench.json [--device cuda] [--algos mvp qc fql] [--threads 1] [--fast-act]
                          [--compile [MODE]]

``--algos`` picks from every agent of ``conf/algo`` with its settings there (``AGENTS``): mvp, mvp_noivc (MVP
without the IVC term, lambda = 0), qc, bfn (QC's best-of-N flow policy without chunking: h = 1, N = 4) and fql, the
FQL agent on h = 5 chunks (the setting of ``qc_fql.yaml``; ``fql.yaml`` runs it at h = 1). The default is mvp, qc
and fql.

Per algorithm (each in a fresh process, so CPU memory peaks do not mix):

* ``act_ms``: median latency of ``sample_actions`` at batch 1 under ``torch.inference_mode`` (MVP: 32 one-step
  candidates + critic; QC: 32 ten-step Euler samples + critic; BFN: 4 ten-step Euler samples + critic; FQL: one
  student call), after warm-up;
* ``act_ms_per_action``: ``act_ms / h``, the compute per environment step when the policy's action queue calls
  the network once per chunk (``act_ms`` stays the worst-case latency of the step that refills the queue);
* ``act_mflop`` and ``act_gflops``: floating-point operations of one ``sample_actions`` call (counted by
  ``torch.utils.flop_counter``: matrix products only) and the rate they ran at, against which the latency can be
  judged (best-of-N latency is bound by these products, not by Python overhead, once ``act_gflops`` nears the
  machine's matmul peak);
* with ``--fast-act``, ``fast_act_ms``: the same call through :func:`manip.algos.acting.fast_sampler` (a frozen copy
  whose networks run in ``--fast-act-dtype``, compiled by inductor with freezing and autotuned matrix products;
  compile time excluded), and ``fast_act_agree``: the share of 50 seeded calls whose chunk is within 0.02 (max
  absolute difference) of the float32 agent's from the same noise (best-of-N may pick another candidate when two
  scores are closer than the precision);
* ``update_its``: full updates per second, as ``ManipModule`` trains (actor loss with the critic frozen, critic
  loss, one backward pass of their sum, one fused Adam step, target update; batch 256), float32 products at
  ``--matmul-precision`` (default "high", training's: TF32 on a GPU that has it); with ``--compile`` both losses are
  ``torch.compile``-d as ``module.compile=<mode>`` does, and ``compile_s`` is the wall time of the warm-up updates
  that compiled them;
* ``peak_mem_mb``: CUDA ``max_memory_allocated``, or on CPU the growth of the peak RSS over the process's RSS
  before the agent was built (once torch's one-time costs are paid: a tiny agent of the same kind acted and updated);
* MVP (and mvp_noivc) also reports ``actor_update_ms`` and ``fm_update_ms``: its actor step versus a plain
  flow-matching step of the same network (u(x, t, t)), whose ratio is the JVP overhead.

Ratios: ``mvp_act_speedup_vs_qc = qc.act_ms / mvp.act_ms``, ``mvp_update_ratio_vs_qc = mvp.update_its /
qc.update_its``, ``jvp_overhead = mvp.actor_update_ms / mvp.fm_update_ms``. ``config`` records the command line's
settings and, under ``agents``, each measured agent's settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from manip.algos import ActorCriticAgent, FlowBoNAgent, FQLAgent, MVPAgent, flatten_chunk, flow_matching_loss
from manip.algos.acting import ACT_DTYPES, fast_sampler
from manip.algos.training import COMPILE_MODES, compiled, frozen, make_optimizer
from manip.cli_args import at_least, new_file
from manip.data.replay import random_chunk_batch
from manip.settings import first_free_path, write_result

OBS_DIM, ACTION_DIM, HORIZON = 19, 7, 5
# name -> (agent class, its settings besides the hidden sizes), as in conf/algo/<name>.yaml; ``horizon`` is the
# chunk length h. "fql" is the FQL agent on the common h = 5 chunks, i.e. conf/algo/qc_fql.yaml's setting
# (conf/algo/fql.yaml runs the same agent at h = 1).
AGENTS: dict[str, tuple[type[ActorCriticAgent], dict]] = {
    "mvp": (MVPAgent, {"horizon": HORIZON, "num_samples": 32}),
    "mvp_noivc": (MVPAgent, {"horizon": HORIZON, "num_samples": 32, "lambda_ivc": 0.0}),
    "qc": (FlowBoNAgent, {"horizon": HORIZON, "num_samples": 32, "flow_steps": 10}),
    "bfn": (FlowBoNAgent, {"horizon": 1, "num_samples": 4, "flow_steps": 10}),
    "fql": (FQLAgent, {"horizon": HORIZON, "alpha": 100.0, "flow_steps": 10}),
}
DEFAULT_ALGOS = ("mvp", "qc", "fql")


def build_agent(algo: str, hidden: tuple[int, ...]) -> ActorCriticAgent:
    """The benchmark's ``algo`` agent (see ``AGENTS``) with MLPs of ``hidden`` sizes, on the CPU."""
    cls, settings = AGENTS[algo]
    return cls(OBS_DIM, ACTION_DIM, hidden_dims=hidden, **settings)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], calls: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``calls`` calls of ``fn`` after ``warmup`` untimed ones, in ms (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(algo: str, args: argparse.Namespace) -> dict[str, float]:
    """Benchmark one algorithm in the current process."""
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    device = torch.device(args.device)
    _warm_up_runtime(algo, device)  # torch's one-time costs stay out of the memory figure
    base_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    agent = build_agent(algo, tuple(args.hidden)).to(device)
    horizon = agent.horizon
    optimizer = make_optimizer(agent.actor_parameters(), agent.critic_parameters(), lr=3e-4)
    actor_opt = make_optimizer(agent.actor_parameters(), [], lr=3e-4)  # the actor step alone (JVP overhead)
    batch = random_chunk_batch(args.batch_size, OBS_DIM, ACTION_DIM, horizon, device=device)
    obs = batch["observations"][:1]
    generator = torch.Generator(device=device).manual_seed(0)

    with torch.inference_mode():
        act_ms = median_ms(lambda: agent.sample_actions(obs), args.act_calls, 20, device)
        with FlopCounterMode(display=False) as flops:
            agent.sample_actions(obs)
    act_flop = flops.get_total_flops()

    actor_loss_fn = compiled(agent.actor_loss, args.compile)
    update = _update(agent, optimizer, actor_loss_fn, compiled(agent.critic_loss, args.compile), batch, generator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.update_warmup):
        update()
    _sync(device)
    warmup_s = time.perf_counter() - start
    # no synchronisation per update, as in training: the host queues the next update while the device runs this one
    iters, start = 0, time.perf_counter()
    while iters < args.min_update_iters or time.perf_counter() - start < args.update_seconds:
        update()
        iters += 1
    _sync(device)
    result = {"act_ms": act_ms, "act_ms_per_action": act_ms / horizon, "act_mflop": act_flop / 1e6,
              "act_gflops": act_flop / act_ms / 1e6, "update_its": iters / (time.perf_counter() - start)}
    if args.compile:
        result["compile_s"] = warmup_s

    if isinstance(agent, MVPAgent):
        actions, mask = flatten_chunk(batch["actions"], batch["valid"])

        def velocity(o: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return agent.actor(o, x, t, t)

        def fm_loss() -> torch.Tensor:
            return flow_matching_loss(velocity, batch["observations"], actions, mask, generator=generator)

        fm_loss_fn = compiled(fm_loss, args.compile)
        def actor_step(loss_fn: Callable[[], torch.Tensor]) -> None:
            torch.compiler.cudagraph_mark_step_begin()
            _step(actor_opt, loss_fn())

        with frozen(agent.critic):  # as in update(): the same compiled graphs
            result["actor_update_ms"] = median_ms(
                lambda: actor_step(lambda: actor_loss_fn(batch, generator)[0]), args.actor_calls, 3, device)
            result["fm_update_ms"] = median_ms(lambda: actor_step(fm_loss_fn), args.actor_calls, 3, device)

    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mem_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / 2**20
    if args.fast_act:  # last: compilation's memory and worker processes stay out of the figures above
        result.update(_fast_act(agent, obs, args, device))
    return result


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _update(agent: ActorCriticAgent, optimizer: torch.optim.Optimizer, actor_loss_fn: Callable,
            critic_loss_fn: Callable, batch: dict[str, torch.Tensor], generator: torch.Generator) -> Callable[[], None]:
    """One update as ``ManipModule`` trains it: actor loss with the critic frozen, critic loss, one backward pass of
    their sum, one optimizer step, target update."""
    def update() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a new update: CUDA graphs may reuse the last one's memory
        with frozen(agent.critic):
            actor_loss = actor_loss_fn(batch, generator)[0]
        _step(optimizer, actor_loss + critic_loss_fn(batch, generator)[0])
        agent.soft_update(0.005)
    return update


def _warm_up_runtime(algo: str, device: torch.device) -> None:
    """Acts and updates once with a tiny agent of ``algo``'s kind: torch loads and allocates what its first
    products, autograd, JVP and fused optimizer need (about 150 MiB of a CPU process), not the agent."""
    agent = build_agent(algo, (8,)).to(device)
    batch = random_chunk_batch(4, OBS_DIM, ACTION_DIM, agent.horizon, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        agent.sample_actions(batch["observations"][:1])
    optimizer = make_optimizer(agent.actor_parameters(), agent.critic_parameters(), lr=3e-4)
    _update(agent, optimizer, agent.actor_loss, agent.critic_loss, batch, generator)()
    _sync(device)


def _fast_act(agent: torch.nn.Module, obs: torch.Tensor, args: argparse.Namespace,
              device: torch.device) -> dict[str, float]:
    """``fast_act_ms`` and ``fast_act_agree`` (see the module docstring) of ``agent`` at batch ``obs``."""
    fast = fast_sampler(agent, args.fast_act_dtype, compile=True)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    generator = seeded(0)
    fast_ms = median_ms(lambda: fast(obs, generator=generator), args.act_calls, 20, device)  # 1st call compiles
    with torch.inference_mode():
        agree = [bool((fast(obs, generator=seeded(i)) - agent.sample_actions(obs, generator=seeded(i))).abs().max()
                      <= 0.02) for i in range(50)]
    return {"fast_act_ms": fast_ms, "fast_act_agree": sum(agree) / len(agree)}


def _ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    ratios = {}
    if "mvp" in results and "qc" in results:
        ratios["mvp_act_speedup_vs_qc"] = results["qc"]["act_ms"] / results["mvp"]["act_ms"]
        if "fast_act_ms" in results["mvp"]:
            ratios["mvp_fast_act_speedup_vs_qc"] = results["qc"]["fast_act_ms"] / results["mvp"]["fast_act_ms"]
        ratios["mvp_update_ratio_vs_qc"] = results["mvp"]["update_its"] / results["qc"]["update_its"]
    if "mvp" in results:
        ratios["jvp_overhead"] = results["mvp"]["actor_update_ms"] / results["mvp"]["fm_update_ms"]
    return ratios


def _table(results: dict[str, dict[str, float]], ratios: dict[str, float]) -> str:
    lines = [f"{'algo':<10}{'h':>2}{'act_ms':>10}{'ms/action':>11}{'act_MFLOP':>11}{'GFLOP/s':>9}{'update_it/s':>13}"
             f"{'peak_mem_mb':>13}"]
    for algo, r in results.items():
        lines.append(f"{algo:<10}{AGENTS[algo][1]['horizon']:>2}{r['act_ms']:>10.3f}{r['act_ms_per_action']:>11.3f}"
                     f"{r['act_mflop']:>11.1f}{r['act_gflops']:>9.1f}{r['update_its']:>13.3f}{r['peak_mem_mb']:>13.1f}")
    for algo, r in results.items():
        if "fast_act_ms" in r:
            per_action = r["fast_act_ms"] / AGENTS[algo][1]["horizon"]
            lines.append(f"{algo} fast act {r['fast_act_ms']:.3f} ms ({per_action:.3f} ms/action), "
                         f"{r['fast_act_agree']:.2f} of seeded chunks within 0.02 of float32")
    for algo, r in results.items():
        if "compile_s" in r:
            lines.append(f"{algo} compiled update: first {r['compile_s']:.1f} s (compilation), then "
                         f"{r['update_its']:.3f} it/s")
    for algo, r in results.items():
        if "actor_update_ms" in r:
            lines.append(f"{algo} actor step {r['actor_update_ms']:.2f} ms vs flow matching {r['fm_update_ms']:.2f} ms")
    lines += [f"{k} = {v:.2f}" for k, v in ratios.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings; an unusable value exits with ``parser.error`` (usage and one line, status 2)."""
    parser = argparse.ArgumentParser(prog="python -m manip.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, type=new_file,
                        help="JSON output path, a new file in an existing directory (default: bench.json, or the "
                             "first free bench.<k>.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS), choices=list(AGENTS),
                        help="agents to measure, each in its own process (default: %(default)s); settings of "
                             "conf/algo/<name>.yaml, except that fql runs on h = 5 chunks as in qc_fql.yaml")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads")
    parser.add_argument("--hidden", type=at_least(1), nargs="+", default=[512] * 4, help="hidden sizes of every MLP")
    parser.add_argument("--fast-act", action="store_true",
                        help="also time act() through a frozen, compiled copy (manip.algos.acting.fast_sampler)")
    parser.add_argument("--fast-act-dtype", default="bfloat16", choices=list(ACT_DTYPES),
                        help="precision of that copy's networks")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help="torch.compile both losses of the update in this mode (alone: %(const)s), as "
                             "module.compile=<mode> trains; compilation happens in the warm-up updates")
    parser.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision, as in training (default: %(default)s)")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--act-calls", type=at_least(1), default=200, help="timed act() calls (median reported)")
    parser.add_argument("--actor-calls", type=at_least(1), default=20, help="timed MVP / flow-matching actor steps")
    parser.add_argument("--update-warmup", type=at_least(0), default=2)
    parser.add_argument("--min-update-iters", type=at_least(1), default=3)
    parser.add_argument("--update-seconds", type=at_least(0.0, float), default=10.0,
                        help="minimum timed update duration")
    return check_device_and_out(parser, parser.parse_args(argv), "bench.json")


def check_device_and_out(parser: argparse.ArgumentParser, args: argparse.Namespace, default_out: str
                         ) -> argparse.Namespace:
    """``args`` with ``--device`` checked (``parser.error`` for one torch cannot parse or CUDA it does not see) and
    ``--out`` defaulting to the first free name of ``default_out`` (``bench.json``, ``bench.1.json``, ...)."""
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.out is None:
        args.out = str(first_free_path(Path(default_out)))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    results = {}
    for algo in args.algos:
        with ctx.Pool(1) as pool:
            results[algo] = pool.apply(measure, (algo, args))
            pool.close()  # let the worker exit rather than be terminated, so that its finalizers run
            pool.join()
    ratios = _ratios(results)
    config = {
        "obs_dim": OBS_DIM,
        "action_dim": ACTION_DIM,
        "horizon": HORIZON,
        "num_samples": 32,
        "flow_steps": 10,
        **{k: v for k, v in vars(args).items() if k not in ("out", "algos")},
        "agents": {algo: AGENTS[algo][1] for algo in args.algos},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
    }
    report = {**results, "ratios": ratios, "config": config}
    print(_table(results, ratios))
    out = write_result(args.out, json.dumps(report, indent=2), "python -m manip.bench")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
