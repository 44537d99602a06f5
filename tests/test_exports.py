"""The public surface: ``sfmon.__all__`` is sorted, complete and importable."""

from __future__ import annotations

import sfmon


def test_all_is_sorted_and_every_name_exists() -> None:
    names = [n for n in sfmon.__all__ if n != "__version__"]

    assert names == sorted(names)
    assert all(hasattr(sfmon, n) for n in sfmon.__all__)
    public = {n for n in vars(sfmon) if not n.startswith("_") and n != "annotations"}
    modules = {n for n in public if type(getattr(sfmon, n)).__name__ == "module"}
    assert public - modules == set(names)


def test_every_public_callable_has_a_docstring() -> None:
    missing = [n for n in sfmon.__all__ if n != "__version__" and not getattr(sfmon, n).__doc__]
    assert missing == []
