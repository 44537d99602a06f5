"""Ready-made health checks: a check is a callable that returns or raises.

A check passes when it returns anything but ``False`` and fails when it returns
``False`` or raises; :mod:`sfmon.health` runs checks with a timeout and caches their
results, so a check may block.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

__all__ = ["dbapi_check", "sqlite_check"]


def sqlite_check(path: str, *, timeout: float = 2.0) -> Callable[[], bool]:
    """A check that opens the SQLite database at *path* read-only and queries it.

    Fails when the file is missing, unreadable, locked past *timeout*, or corrupt.

    .. code-block:: python

        sfmon.Monitor(app, checks={"database": sfmon.sqlite_check("app.db")})
    """

    def check() -> bool:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"database file {path} is missing")
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
        return True

    check.__name__ = f"sqlite_check({os.path.basename(path)})"
    return check


def dbapi_check(connect: Callable[[], Any], *, query: str = "SELECT 1") -> Callable[[], bool]:
    """A check for any DB-API 2.0 driver: connect, run *query*, close.

    .. code-block:: python

        import psycopg
        check = sfmon.dbapi_check(lambda: psycopg.connect(DSN, connect_timeout=2))
    """

    def check() -> bool:
        con = connect()
        try:
            cur = con.cursor()
            try:
                cur.execute(query)
                cur.fetchone()
            finally:
                cur.close()
        finally:
            con.close()
        return True

    return check
