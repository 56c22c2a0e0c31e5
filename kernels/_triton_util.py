"""Triton plumbing: is Triton importable, can it launch here, and lazily jitted kernels.

Triton decides between compiling and interpreting (``TRITON_INTERPRET=1``, numpy) when a function
is *decorated* with ``triton.jit``. That includes Triton's own library (``tl.zeros``, ``tl.sum``
... are jitted when ``triton.language`` is first imported), so the interpreter works only if the
variable is set before the process first imports triton. Our own kernel bodies are plain
functions that ``LazyJit`` jits on first launch, once per mode, so importing ``kernels`` early
is harmless; ``interpreter_ready`` tells whether Triton's library is in interpreter mode.
"""

from __future__ import annotations

import functools
import os

import torch

_TRUE = {"1", "true", "on", "yes"}


def interpreter_on() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cuda_driver_active() -> bool:
    if not (triton_importable() and torch.cuda.is_available()):
        return False
    try:
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception:
        return False
    return True


def interpreter_ready() -> bool:
    """TRITON_INTERPRET is on *and* triton was imported in interpreter mode (see module doc)."""
    if not (interpreter_on() and triton_importable()):
        return False
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.zeros, InterpretedFunction)


def can_launch(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors living on ``device`` in this process."""
    if not triton_importable():
        return False
    if interpreter_on():
        return device.type == "cpu" and interpreter_ready()
    return device.type == "cuda" and _cuda_driver_active()


class LazyJit:
    """``kernel[grid](*args)`` like a ``triton.jit`` function, jitted at first use per mode."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted = {}

    def __getitem__(self, grid):
        mode = interpreter_on()
        k = self._jitted.get(mode)
        if k is None:
            import triton

            k = self._jitted[mode] = triton.jit(self.fn)
        return k[grid]
