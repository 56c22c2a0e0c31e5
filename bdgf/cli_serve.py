"""``bdgf serve`` and ``bdgf client``: the HTTP endpoint's commands (registered on :data:`bdgf.cli.app`)."""

from __future__ import annotations
