"""Per-stage throughput and peak memory of the single-process pipeline on the ``demo`` preset.

Stages, each in its own Python subprocess so that the peak RSS is the stage's own:

* ``pretrain``: ``bdgf.engine.pretrain.pretrain`` -> tiles/s (the engine's own count: steps ×
  batch / wall, which includes the tile loading);
* ``features``: ``bdgf.engine.features.compute_features`` (dense, all tiles, written to the store)
  -> pixels/s of the scene;
* ``train``: ``bdgf.engine.classify.train`` (three branches, mutual learning) -> patches/s, from
  the engine's per-epoch ``patches_per_s`` (training batches; the clock also covers the epoch's
  small val pass), epoch 1 (warm-up) excluded.

Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the stage's process (Linux: KiB;
whole process, so Python + torch + libraries are included), printed beside the RSS measured just
before the stage starts (after imports and opening the store), whose difference is what the stage
itself added.

Config: the demo config (``bdgf.demo.DEMO_OVERRIDES``), except the number of pretraining steps and
classifier epochs (``--pretrain-steps``, ``--epochs``), which only set how long the throughput is
averaged over. No assertion on time.

    .venv/bin/python benchmarks/bench_stages.py [--pretrain-steps 60] [--epochs 4] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD0 = __import__("os").getloadavg()  # 1/5/15-min load when the script started
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]


def _rss_now_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(stage: str, work: Path, pretrain_steps: int, epochs: int, threads: int) -> dict:
    import numpy as np
    import torch

    from bdgf.config import RunConfig
    from bdgf.data.scene import Scene
    from bdgf.demo import DEMO_OVERRIDES
    from bdgf.engine.classify import train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.run import read_jsonl

    if threads:
        torch.set_num_threads(threads)
    store, run = work / "demo.zarr", work / "run"
    scene = Scene.open(store)
    cfg = RunConfig().with_overrides({**DEMO_OVERRIDES, "pretrain.steps": pretrain_steps,
                                      "pretrain.checkpoint_every": pretrain_steps, "train.epochs": epochs,
                                      "train.patience": epochs})
    rss_before = _rss_now_kib()
    t0 = time.perf_counter()
    out: dict = {"stage": stage, "threads": torch.get_num_threads()}
    if stage == "pretrain":
        s = pretrain(store, run, cfg, overwrite=True, progress=False).to_dict()
        out.update(rate=s["tiles_per_s"], unit="tiles/s",
                   detail=f"{pretrain_steps} steps × batch {cfg.pretrain.batch_size} of "
                          f"{cfg.pretrain.tile_size}×{cfg.pretrain.tile_size} tiles")
    elif stage == "features":
        s = compute_features(store, run, progress=False).to_dict()
        h, w = scene.shape
        import zarr

        halo = zarr.open_group(str(store), mode="r")["features"].attrs["spec"]["halo"]
        variants = sum("_without_" in k for k in s["channels"]) // 3
        out.update(rate=s["pixels_per_s"], unit="pixels/s",
                   detail=f"{h}×{w} px, tiles {cfg.features.tile_size} + halo {halo}, "
                          f"timesteps {cfg.features.timesteps}, {1 + variants} presence variants, state {s['state']}")
    elif stage == "train":
        s = train(store, run, seed=0, progress=False).to_dict()
        log = read_jsonl(run / "train" / "seed0" / "log.jsonl")
        rates = [r["patches_per_s"] for r in log if "patches_per_s" in r]
        n_train = int((scene.labels("train") > 0).sum())
        out.update(rate=float(np.mean(rates[1:] if len(rates) > 1 else rates)), unit="patches/s",
                   detail=f"{epochs} epochs (best val at {s['epoch']}) over {n_train} train px, batch "
                          f"{cfg.train.batch_size}, branches {cfg.train.branches}; per epoch {[round(r, 1) for r in rates]}")
    else:
        raise SystemExit(f"unknown stage {stage}")
    out["wall_s"] = time.perf_counter() - t0
    out["rss_before_mib"] = rss_before / 1024
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["pretrain", "features", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/bdgf_bench/stages")
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each stage (0: leave)")
    ap.add_argument("--results", default=None, help="write the section into this RESULTS.md")
    args = ap.parse_args(argv)
    work = Path(args.work)

    if args.stage:  # inside a stage subprocess
        print("RESULT " + json.dumps(child(args.stage, work, args.pretrain_steps, args.epochs, args.threads)))
        return 0

    import torch

    from bdgf.data.scene import write_scene
    from bdgf.data.synthetic import make_scene

    work.mkdir(parents=True, exist_ok=True)
    write_scene(make_scene("demo", 0), work / "demo.zarr", overwrite=True, progress=False)
    results = []
    for stage in ("pretrain", "features", "train"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work", str(work),
               "--pretrain-steps", str(args.pretrain_steps), "--epochs", str(args.epochs), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"stage {stage} failed (rc {proc.returncode})")
        r = json.loads(lines[-1][len("RESULT "):])
        results.append(r)
        print(f"{stage}: {r['rate']:.1f} {r['unit']}, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(before the stage {r['rss_before_mib']:.0f} MiB), wall {r['wall_s']:.1f} s — {r['detail']}", flush=True)
    (work / "stages.json").write_text(json.dumps(results, indent=2))
    table = "\n".join(
        ["| stage | throughput | peak RSS (MiB) | RSS before stage (MiB) | wall (s) | what was run |",
         "| --- | --- | --- | --- | --- | --- |"]
        + [f"| {r['stage']} | {r['rate']:.1f} {r['unit']} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} | "
           f"{r['wall_s']:.1f} | {r['detail']} |" for r in results])
    print("\n" + table)
    section = "\n".join([
        "## Per-stage throughput and peak memory (demo preset, demo config)",
        "",
        f"Run {_dt.date.today().isoformat()} on {platform.node() or 'this machine'}: 2 CPU cores shared with other jobs "
        f"(load average {LOAD0[0]:.1f} / {LOAD0[1]:.1f} / {LOAD0[2]:.1f} at start; end {__import__('os').getloadavg()[0]:.1f}), torch {torch.__version__}, {results[0]['threads']} torch threads per stage. Command: "
        f"`.venv/bin/python benchmarks/bench_stages.py --pretrain-steps {args.pretrain_steps} --epochs {args.epochs}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}`.",
        "",
        "Each stage runs in its own subprocess; peak memory is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of "
        "that process (whole process: Python, torch and libraries included; 'RSS before stage' is VmRSS after "
        "imports, just before the stage starts). Config: `DEMO_OVERRIDES`, with pretraining steps and classifier "
        "epochs cut to the numbers in the command (they only set how long the rates are averaged over). "
        "Train patches/s excludes epoch 1 and its clock includes each epoch's val pass.",
        "",
        table,
        "",
    ])
    if args.results:
        from bench_ablation import write_results

        write_results(Path(args.results), section)
        print(f"wrote section into {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
