from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[str]:
    """A fresh store directory for this process's writer (reset afterwards)."""
    from sfmon import store

    d = str(tmp_path / "store")
    os.makedirs(d)
    store.reset_for_tests(d)
    yield d
    store.reset_for_tests(None)
