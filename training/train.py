"""Stage 2 (one classifier per seed) on Ray Train workers (DeepSpeed inside each).

    python training/train.py --store S.zarr --run RUN --workers 2 [--seeds 0,1] [--set train.epochs=5]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root

from training.launch import main_train  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_train())
