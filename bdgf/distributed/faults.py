"""Fault injection for the fault-tolerance test and benchmark: a real process death, once."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterable, Iterator

FAULT_ENV = "BDGF_FAULT_INJECT"  # "STEP:MARKER_PATH[:RANK]": kill that rank once before STEP


def fault_from_env() -> dict | None:
    """The fault the driver passes to the workers, from ``BDGF_FAULT_INJECT``, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    return {"step": int(parts[0]), "marker": parts[1], "rank": int(parts[2]) if len(parts) > 2 else 1}


def fault_injection(batches: Iterable, start: int, rank: int, fault: dict | None) -> Iterator:
    """Pass batches through; with ``fault`` = {"step", "rank", "marker"} SIGKILL this worker
    process when it is about to run that step, once (the marker file records that it fired)."""
    if not fault:
        yield from batches
        return
    step = start
    for batch in batches:
        step += 1
        if rank == int(fault["rank"]) and step == int(fault["step"]):
            marker = Path(fault["marker"])
            if not marker.exists():
                marker.write_text(f"killed rank {rank} (pid {os.getpid()}) before step {step}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        yield batch


class FaultyLoader:
    """A loader whose batches pass through :func:`fault_injection`, counting steps across epochs:
    each pass starts at ``counters["step"]`` (the loop's global step when the epoch begins)."""

    def __init__(self, loader, counters: dict, rank: int, fault: dict | None):
        self.loader, self.counters, self.rank, self.fault = loader, counters, rank, fault

    def __iter__(self) -> Iterator:
        return fault_injection(iter(self.loader), int(self.counters.get("step", 0)), self.rank, self.fault)

    def __len__(self) -> int:
        return len(self.loader)
