"""``bdgf classify``: bulk classification of mosaics (registered on :data:`bdgf.cli.app`)."""

from __future__ import annotations
