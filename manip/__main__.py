"""``python -m manip``: the entry points, one line each."""

from manip import __version__

USAGE = f"""manip {__version__}: offline-to-online robot-manipulation policies (MVP, QC, FQL; SOM / RFM fine-tuning)

  python -m manip.fit conf=robomimic_lift [algo=qc] [key=value ...]     offline training (Hydra overrides)
  python -m manip.finetune ckpt=PATH [finetune.target=som] [...]         online fine-tuning in the simulator
  python -m manip.evaluate ckpt=PATH episodes=50 [video=true]            success rate, 95% CI, videos
  python -m manip.export ckpt=PATH [aoti=true]                           the acting policy as a PyTorch-only program
  python -m manip.data.generate {{robomimic,ogbench}} [...]                datasets in the real files' formats
  python -m manip.bench --out bench.json [--device cuda]                 act latency, update speed, memory
  python -m manip.bench_envs [--workers 1 2]                             simulator steps per second

Presets: conf/conf/*.yaml (conf=...); groups: data/, algo/, trainer/, logger/. `python -m manip.fit --help`
lists them with the composed config."""

if __name__ == "__main__":
    print(USAGE)
