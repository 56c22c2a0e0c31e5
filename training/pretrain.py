"""Stage 1 for `ray job submit`: `bdgf pretrain` (the one command line) on Ray Train workers.

    ray job submit --working-dir . -- python training/pretrain.py S.zarr [S2.zarr] --out RUN --workers 2
    python training/pretrain.py --help        # every option of `bdgf pretrain`
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a working dir

from bdgf.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]])
