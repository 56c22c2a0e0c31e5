"""Distributed pretraining costs on this machine (local Ray, CPU, gloo, DeepSpeed).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 40] [--scene tiny]

Measures, on the same data and model:
  * plain single-process ``pretrain_loop`` (TorchStepper) throughput;
  * Ray Train + DeepSpeed with 1 worker (the overhead of the stack) and 2 workers (scaling);
  * a 2-worker run where rank 1 is SIGKILLed mid-run: time to resume and steps lost;
  * peak resident memory per worker (ru_maxrss, read in the workers).
Throughput is steady-state global tiles/s from the loop's own log (excluding start-up); wall
times include Ray/DeepSpeed start-up. Prints a JSON summary and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bdgf.config import RunConfig  # noqa: E402
from bdgf.run import read_jsonl  # noqa: E402


def config(steps: int, checkpoint_every: int) -> RunConfig:
    return RunConfig().with_overrides({
        "pretrain.tile_size": 32, "pretrain.batch_size": 8, "pretrain.steps": steps, "pretrain.log_every": 5,
        "pretrain.checkpoint_every": checkpoint_every,
        "pretrain.unet": {"base_channels": 16, "channel_mults": [1, 2], "feature_levels": [0, 1, 1]},
        "pretrain.masking": {"mode": "adaptive", "warmup_steps": 5},
    })


def steady(run: Path, skip: int = 1) -> float:
    """Median global tiles/s over the logged windows after the first ``skip``."""
    recs = [r for r in read_jsonl(run / "pretrain" / "log.jsonl") if "loss" in r][skip:]
    vals = sorted(r.get("global_tiles_per_s", r["tiles_per_s"]) for r in recs)
    return vals[len(vals) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--scene", default="tiny")
    a = ap.parse_args()
    import ray

    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.distributed.faults import FAULT_ENV
    from bdgf.engine.pretrain import pretrain

    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    store = tmp / "scene.zarr"
    write_scene(make_scene(a.scene, 0), store)
    out: dict = {"steps": a.steps, "scene": a.scene, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    cfg = config(a.steps, a.steps)  # one checkpoint at the end (each report costs ~2 s)

    t0 = time.perf_counter()
    pretrain(store, tmp / "plain", cfg, progress=False)
    out["plain"] = {"wall_s": time.perf_counter() - t0, "tiles_per_s": steady(tmp / "plain")}

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    out["ray_init_s"] = time.perf_counter() - t0
    for n in (1, 2):
        t0 = time.perf_counter()
        s = pretrain(store, tmp / f"ray{n}", cfg, workers=n, progress=False)
        out[f"ray{n}"] = {"wall_s": time.perf_counter() - t0, "tiles_per_s": steady(tmp / f"ray{n}"),
                          "engine": s.engine}

    # Killed worker: checkpoint every 10 steps, rank 1 dies before step 25 (first attempt only).
    kill_at, every = 25, 10
    os.environ[FAULT_ENV] = f"{kill_at}:{tmp / 'killed'}:1"
    t0 = time.perf_counter()
    pretrain(store, tmp / "kill", config(a.steps, every), workers=2, max_failures=2, progress=False)
    wall = time.perf_counter() - t0
    del os.environ[FAULT_ENV]
    killed_at = (tmp / "killed").stat().st_mtime
    restarts = read_jsonl(tmp / "kill" / "pretrain" / "restarts.jsonl")
    resumed = time.mktime(time.strptime(restarts[0]["time"], "%Y-%m-%dT%H:%M:%S"))
    out["kill"] = {"wall_s": wall, "killed_before_step": kill_at, "resumed_from_step": restarts[0]["resumed_from_step"],
                   "steps_lost": kill_at - 1 - restarts[0]["resumed_from_step"], "checkpoint_every": every,
                   "time_to_resume_s": resumed - killed_at}
    # Peak memory per worker process: ru_maxrss of the Ray Train workers of the last run is gone
    # with them, so measure it in a fresh 2-worker run that reports it.
    out["peak_rss_mib_per_worker"] = _peak_rss(store, tmp, cfg)
    ray.shutdown()

    p, r1, r2 = out["plain"]["tiles_per_s"], out["ray1"]["tiles_per_s"], out["ray2"]["tiles_per_s"]
    out["ratios"] = {
        "ray2_vs_ray1_throughput": r2 / r1,
        "ray1_vs_plain_throughput": r1 / p,
        "ray1_vs_plain_wall": out["ray1"]["wall_s"] / out["plain"]["wall_s"],
        "ray2_vs_plain_wall": out["ray2"]["wall_s"] / out["plain"]["wall_s"],
    }
    print(json.dumps(out, indent=2))


def _body_with_rss(job: dict, ctx) -> None:
    """The library's pretraining body, then this worker's peak RSS into a file."""
    import resource

    from bdgf.engine.pretrain import pretrain_body

    pretrain_body(job, ctx)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    (Path(job["rss_dir"]) / f"rank{ctx.rank}").write_text(str(rss))


def _peak_rss(store: Path, tmp: Path, cfg: RunConfig) -> list[float]:
    """Run 2 workers through the same stage body and read ru_maxrss at the end of each."""
    from bdgf.data.stores import open_stores
    from bdgf.distributed.launch import prepare_launch
    from bdgf.engine.pretrain import pretrain_signature
    from bdgf.run import Run

    scene = open_stores([store])[0]
    names = scene.modality_names
    bands = [scene.bands[n] for n in names]
    run = Run(tmp / "rss").create(scene, cfg)
    signature = pretrain_signature(cfg.pretrain, names, bands)
    launch = prepare_launch("pretrain", run, name="rss", workers=2, address=None,
                            micro_batch=cfg.pretrain.batch_size, grad_clip=cfg.pretrain.grad_clip, ds_config=None,
                            storage=None, max_failures=0, signature=signature)
    rss_dir = tmp / "rss_out"
    rss_dir.mkdir()
    job = {"stores": [str(store)], "run_config": cfg.to_dict(), "signature": signature, "init_from": None,
           "micro_batch": launch.micro_batch, "progress": False, "rss_dir": str(rss_dir)}
    launch.fit(_body_with_rss, job, out_dir=run.stage_dir("pretrain"))
    return [float((rss_dir / f"rank{r}").read_text()) for r in range(2)]


if __name__ == "__main__":
    main()
