"""Stage 2 for `ray job submit`: `bdgf train` (one classifier per seed) on Ray Train workers.

    ray job submit --working-dir . -- python training/train.py S.zarr --run RUN --workers 2 [--seeds 0,1]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a working dir

from bdgf.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
