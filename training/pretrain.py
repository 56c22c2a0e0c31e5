"""Stage 1 on Ray Train workers (DeepSpeed inside each).

    python training/pretrain.py --store S.zarr [--store S2.zarr] --out RUN --workers 2 [--config C.yaml] [--set k=v]
    ray job submit --working-dir . -- python training/pretrain.py --store S.zarr --out RUN --workers 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root

from training.launch import main_pretrain  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_pretrain())
