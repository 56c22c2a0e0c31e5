"""Dense diffusion features for `ray job submit`: `bdgf features` as Ray tasks over disjoint tiles.

    ray job submit --working-dir . -- python training/features.py S.zarr --run RUN --workers 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a working dir

from bdgf.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["features", *sys.argv[1:]])
