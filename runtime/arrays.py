"""The array module the decoding loop runs on: numpy on the host, cupy on an NVIDIA GPU.

The loop is written once against the numpy interface that both provide; only token ids cross
to the host each step (`to_host`)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from apd_deploy.accelerators import require_cupy

ARRAY_BACKENDS = ("numpy", "cupy")


def array_module(name: str) -> ModuleType:
    if name == "numpy":
        return np
    if name == "cupy":
        return require_cupy()
    raise ValueError(f"array backend {name!r} is not one of {ARRAY_BACKENDS}")


def to_host(array) -> np.ndarray:
    """A numpy copy of a numpy or cupy array (cupy arrays have `.get()`)."""
    return array if isinstance(array, np.ndarray) else array.get()


def synchronize(xp: ModuleType) -> None:
    """Wait for the device's queued work (nothing to wait for with numpy)."""
    if xp is not np:
        xp.cuda.Device().synchronize()
