"""Progress of long loops: a tqdm bar on a terminal, a few plain lines in a pipe or a log file.

One API for every stage (writing a scene, pretraining, features, training)::

    with Progress(total=epochs, desc="train", unit="epoch") as bar:
        for epoch in ...:
            for batch in ...:
                bar.update(0, loss=loss)           # figures: the bar's postfix on a terminal
            bar.update(1)
            bar.line(loss=loss, val_oa=oa)         # a milestone: one line in a log

    for name, mod in progress(items, "writing modalities", "modality"):
        ...

Where the output goes: ``file`` (default ``sys.stderr``). The mode is chosen once, when the
progress starts:

``bar``
    the stream is a terminal (``file.isatty()``): a tqdm bar, the latest figures as its postfix;
    ``line()`` only updates the postfix.
``lines``
    anything else (a pipe, ``make demo > log``): no bar and no carriage returns, only whole lines::

        train: 12/30 epoch  loss=0.412 val_oa=0.953
        train: 30/30 epoch in 1m05s  loss=0.398 val_oa=0.961

    A line each time another 10 % of ``total`` is reached (at most 9 for a whole loop; none when the
    total is unknown), one per ``line()`` call, and a final one on ``close()`` with the count, the
    elapsed time and the last figures. Format: ``"{desc}: {n}/{total} {unit}"`` (``"{n} {unit}"``
    without a total), then `` in {elapsed}`` on the final line, then two spaces and the figures as
    ``key=value`` separated by single spaces, floats to 4 significant digits.
``off``
    nothing at all; also whenever ``enabled=False``.

The environment variable ``BDGF_PROGRESS=bar|lines|off`` forces a mode for every progress in the
process (``auto`` or unset: by ``isatty()``). It cannot turn on a progress created with
``enabled=False``.
"""

from __future__ import annotations

import numbers
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator, TextIO

__all__ = ["Progress", "progress", "format_figures", "ENV_VAR"]

ENV_VAR = "BDGF_PROGRESS"
_MODES = ("bar", "lines", "off")


class Progress:
    """A count towards ``total`` (None: unknown) with figures; a context manager (``close`` on exit).

    ``initial`` starts the count part-way (a resumed run); the 10 % lines then start after it.
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 file: TextIO | None = None):
        self.total = total
        self.desc, self.unit = desc, unit
        self.n = initial
        self.figures: dict[str, Any] = {}
        self.file = file if file is not None else sys.stderr
        self.mode = _mode(self.file) if enabled else "off"
        self._iterable: Iterable | None = None
        self._start = time.monotonic()
        self._closed = False
        self._tenth = self._tenths()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file)

    # --- counting -------------------------------------------------------------------------
    def update(self, n: int = 1, **figures: Any) -> None:
        """Add ``n`` to the count (0: only new figures); figures are kept until replaced."""
        if self.mode == "off" or self._closed:
            return
        self.n += n
        self.figures.update(figures)
        if self._bar is not None:
            if figures:
                self._bar.set_postfix(self._postfix(), refresh=False)
            self._bar.update(n)
            return
        tenth = self._tenths()
        if tenth > self._tenth:
            self._tenth = tenth
            if tenth < 10:  # the end is the final line's
                self._write(self._status())

    def line(self, **figures: Any) -> None:
        """A milestone (the end of an epoch): one line in ``lines`` mode, the bar's postfix on a terminal."""
        if self.mode == "off" or self._closed:
            return
        self.figures.update(figures)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(), refresh=True)
        else:
            self._write(self._status())

    def close(self) -> None:
        """End the bar, or write the final line: count, elapsed time, last figures. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._write(self._status(final=True))

    @property
    def elapsed(self) -> float:
        """Seconds since the progress started."""
        return time.monotonic() - self._start

    # --- context manager and iteration ----------------------------------------------------
    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        """The items of the iterable given to ``progress()``, counting each one; closes at the end."""
        if self._iterable is None:
            raise TypeError("this Progress wraps no iterable; use progress(iterable, ...)")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    # --- text -----------------------------------------------------------------------------
    def _tenths(self) -> int:
        return min(self.n * 10 // self.total, 10) if self.total else 0

    def _status(self, final: bool = False) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}"
        if final:
            text += f" in {_duration(self.elapsed)}"
        figures = format_figures(self.figures)
        return f"{text}  {figures}" if figures else text

    def _postfix(self) -> dict[str, str]:
        return {k: _format(v) for k, v in self.figures.items()}

    def _write(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()


def progress(iterable: Iterable, desc: str, unit: str, *, total: int | None = None, enabled: bool = True,
             file: TextIO | None = None) -> Progress:
    """``iterable`` with progress: iterate over the result (it counts each item and closes at the end).
    ``total`` defaults to ``len(iterable)`` where there is one. Figures: ``.update(0, **figures)``."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    p = Progress(total, desc, unit, enabled=enabled, file=file)
    p._iterable = iterable
    return p


def format_figures(figures: dict[str, Any]) -> str:
    """``{"loss": 0.41234, "step": 3}`` -> ``"loss=0.4123 step=3"``."""
    return " ".join(f"{k}={_format(v)}" for k, v in figures.items())


def _format(value: Any) -> str:
    """Floats (Python, NumPy, 0-d tensors) to 4 significant digits; anything else as str()."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _mode(file: TextIO) -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _MODES:
        return forced
    if forced not in ("", "auto"):
        warnings.warn(f"{ENV_VAR}={forced!r} is not one of {_MODES} or 'auto'; choosing by the stream",
                      stacklevel=3)
    try:
        return "bar" if file.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"
