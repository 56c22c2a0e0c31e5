"""Dense diffusion features with Ray tasks over disjoint tiles, cached in the store.

    python training/features.py --store S.zarr --run RUN --workers 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root

from training.launch import main_features  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_features())
