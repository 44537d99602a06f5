from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_sfmon_env() -> Iterator[None]:
    """No test sees SFMON_* settings left by another."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SFMON_")}
    for k in saved:
        del os.environ[k]
    yield
    for k in [k for k in os.environ if k.startswith("SFMON_")]:
        del os.environ[k]
    os.environ.update(saved)
