"""Evaluate a checkpoint: ``python -m manip.evaluate ckpt=PATH episodes=50 num_envs=2 [video=true]``.

Prints and writes (JSON next to the run) the success rate with its Wilson 95% interval, the mean
episode length, per-episode outcomes and the per-action latency of the policy.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from manip.checkpoint import env_spec_of, load_module
from manip.envs import make_vector_env
from manip.evaluation import evaluate_policy


def evaluate_checkpoint(ckpt: str, episodes: int = 50, num_envs: int = 1, seed: int = 1000,
                        num_samples: int | None = None) -> dict:
    module, cfg = load_module(ckpt)
    env = make_vector_env(env_spec_of(cfg), num_envs)
    try:
        result = evaluate_policy(env, partial(module.predict_chunks, num_samples=num_samples), episodes, seed)
    finally:
        env.close()
    return {"ckpt": str(ckpt), "algo": cfg["algo"]["name"], "env": cfg["env_spec"]["kind"],
            "task": cfg["data_info"].get("env_name"), "seed": seed, "num_envs": num_envs,
            **result.to_dict()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    result = evaluate_checkpoint(cfg.ckpt, cfg.episodes, cfg.num_envs, cfg.seed, cfg.num_samples)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "eval" / f"{Path(cfg.ckpt).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"success rate {result['success_rate']:.3f}  95% CI [{result['ci_low']:.3f}, {result['ci_high']:.3f}]  "
          f"over {result['episodes']} episodes of {result['task']} ({result['algo']})")
    print(f"mean episode length {result['mean_length']:.1f}  action latency {result['action_latency_ms']:.2f} ms  "
          f"wall {result['seconds']:.1f} s  -> {out}")


if __name__ == "__main__":
    main()
