"""SoftFactory demo: a small Flask API on SQLite, monitored by sfmon.

Run it with ``scripts/demo`` (gunicorn, several workers). Routes need
``Authorization: Bearer demo_token``; the monitoring endpoints live under
``/api/metrics``.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request, stream_with_context

import sfmon

HERE = Path(__file__).resolve().parent
DB_PATH = Path(os.environ.get("SOFTFACTORY_DB", str(HERE / "softfactory.sqlite3")))
TOKEN = os.environ.get("SOFTFACTORY_TOKEN", "demo_token")
TABLES = ("users", "payments", "bookings", "sns_posts", "campaigns", "ai_employees")
SEED_ROWS = {
    "users": 256,
    "payments": 1024,
    "bookings": 512,
    "sns_posts": 2048,
    "campaigns": 128,
    "ai_employees": 64,
}
CHEFS = [
    {"id": i, "name": f"Chef {i}", "cuisine": c}
    for i, c in enumerate(["korean", "italian", "french", "thai"], start=1)
]

log = logging.getLogger("softfactory.api")
audit = logging.getLogger("softfactory.audit")

payments_failed = sfmon.counter(
    "softfactory_payments_failed_total", "Payments that failed", ["reason"]
)
last_backup = sfmon.gauge(
    "softfactory_last_backup_timestamp_seconds",
    "Unix time of the last successful backup",
    mode="max",
)
active_users = sfmon.gauge(
    "softfactory_active_users", "Users active in the last 15 minutes", mode="mostrecent"
)


def init_db(path: Path = DB_PATH) -> None:
    """Create and seed the database once; safe when several workers race."""
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("BEGIN IMMEDIATE")
        for table in TABLES:
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, data TEXT)")
        for table, rows in SEED_ROWS.items():
            (count,) = con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            if count == 0:
                con.executemany(
                    f"INSERT INTO {table} (data) VALUES (?)",
                    [(f"{table}-{i}",) for i in range(rows)],
                )
        con.execute("COMMIT")
    finally:
        con.close()


def database_stats() -> dict[str, float]:
    """Row counts of the business tables and the database size (for /summary)."""
    con = sqlite3.connect(f"file:{DB_PATH}?mode=ro", uri=True, timeout=2)
    try:
        stats: dict[str, float] = {
            t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES
        }
    finally:
        con.close()
    stats["size_bytes"] = DB_PATH.stat().st_size
    return stats


def db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = sqlite3.connect(DB_PATH, timeout=10)
    return g.db


def create_app() -> Flask:
    init_db()
    # Series exist from the start, so increase() sees the first failure and a missing
    # backup shows as an old timestamp rather than no data.
    payments_failed.labels("card_declined").inc(0)
    backup_file = DB_PATH.with_suffix(".backup")
    last_backup.set(backup_file.stat().st_mtime if backup_file.exists() else 0)
    app = Flask(__name__)

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        con = g.pop("db", None)
        if con is not None:
            con.close()

    @app.before_request
    def authenticate() -> None:
        if request.path.startswith("/api/metrics") or request.path == "/":
            return
        header = request.headers.get("Authorization", "")
        if header != f"Bearer {TOKEN}":
            log.warning("Invalid or expired token", extra={"client_ip": request.remote_addr})
            abort(401)
        request.environ["sfmon.user_id"] = "demo"

    @app.get("/")
    def index() -> Response:
        return jsonify(service="softfactory", docs="/api/metrics/summary")

    @app.get("/api/coocook/chefs")
    def chefs() -> Response:
        log.info("listing chefs")
        return jsonify(chefs=CHEFS)

    @app.get("/api/coocook/chefs/<int:chef_id>")
    def chef(chef_id: int) -> Response:
        for c in CHEFS:
            if c["id"] == chef_id:
                return jsonify(c)
        abort(404)

    @app.get("/api/coocook/bookings")
    def bookings() -> Response:
        rows = db().execute("SELECT id, data FROM bookings ORDER BY id DESC LIMIT 10").fetchall()
        return jsonify(bookings=[{"id": r[0], "data": r[1]} for r in rows])

    @app.post("/api/coocook/bookings")
    def book() -> tuple[Response, int]:
        con = db()
        cur = con.execute("INSERT INTO bookings (data) VALUES (?)", ("booking",))
        con.commit()
        log.info("booking created", extra={"booking_id": cur.lastrowid})
        return jsonify(id=cur.lastrowid), 201

    @app.post("/api/payments")
    def pay() -> tuple[Response, int]:
        body = request.get_json(silent=True) or {}
        if body.get("fail") or random.random() < float(
            os.environ.get("SOFTFACTORY_FAIL_RATE", "0")
        ):
            payments_failed.labels("card_declined").inc()
            log.error("payment failed", extra={"reason": "card_declined"})
            return jsonify(error="card_declined"), 402
        con = db()
        con.execute("INSERT INTO payments (data) VALUES (?)", ("payment",))
        con.commit()
        return jsonify(status="paid"), 201

    @app.post("/api/admin/backup")
    def backup() -> Response:
        target = DB_PATH.with_suffix(".backup")
        src = db()
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
        last_backup.set_to_current_time()
        audit.info("database backup", extra={"action": "backup", "user_id": "demo"})
        return jsonify(status="ok", path=target.name)

    @app.get("/api/users/active")
    def users_active() -> Response:
        count = db().execute("SELECT COUNT(*) FROM users").fetchone()[0]
        active_users.set(count // 10)
        return jsonify(active=count // 10)

    @app.get("/api/slow")
    def slow() -> Response:
        ms = min(float(request.args.get("ms", "100")), 10_000)
        time.sleep(ms / 1000)
        return jsonify(slept_ms=ms)

    @app.get("/api/stream")
    def stream() -> Response:
        ms = min(float(request.args.get("ms", "600")), 10_000)
        parts = 6

        def generate():  # type: ignore[no-untyped-def]
            for i in range(parts):
                time.sleep(ms / 1000 / parts)
                yield f"chunk {i}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.get("/api/cpu")
    def cpu() -> Response:
        deadline = time.process_time() + min(float(request.args.get("s", "1")), 10)
        n = 0
        while time.process_time() < deadline:
            n += 1
        return jsonify(loops=n)

    @app.get("/api/error")
    def error() -> Response:
        raise RuntimeError("demo failure")

    @app.get("/api/items/<int:item_id>")
    def item(item_id: int) -> Response:
        return jsonify(id=item_id)

    app.wsgi_app = sfmon.Monitor(  # type: ignore[method-assign]
        app.wsgi_app,
        checks={"database": sfmon.sqlite_check(str(DB_PATH))},
        stats=database_stats,
        service_version=os.environ.get("SOFTFACTORY_VERSION", "1.0.0"),
    )
    return app


app = create_app()
