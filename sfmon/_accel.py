"""The optional C speedups, ``sfmon._speedups``, or ``None``.

Built from ``sfmon/_speedups.c`` when sfmon is installed with a C compiler at hand;
without it sfmon runs the same logic in pure Python (slower per request, identical in
behaviour). ``SFMON_SPEEDUPS=0`` in the environment, read once at import, forces the
pure-Python path (for comparisons, or to rule the C code out when debugging).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["speedups"]


def _load() -> ModuleType | None:
    if os.environ.get("SFMON_SPEEDUPS", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _speedups
    return module


speedups: ModuleType | None = _load()
