"""Requests/s and server CPU per request under ``gunicorn -w 2`` + ``wrk``, per variant.

Every variant of the gunicorn subset (``bench/peers.py``) gets its own gunicorn (sync
workers, 127.0.0.1, a free port, its own ``PROMETHEUS_MULTIPROC_DIR``); sfmon's variants
run with sfmon's gunicorn hooks, as ``gunicorn.conf.py`` would. All servers are started
first; then, each round, every variant gets a ``wrk`` run right after a run of the bare
app of its base (trivial or Flask), and its ratio is taken against that run only (the
machine's load drifts within seconds); the median over rounds is reported. The server's
CPU (master + workers, ``psutil``) is read before and after every run.

Then the exactness check: ``ab -n N`` against sfmon (with all log files) and the
prometheus_client floor with ``--max-requests`` so workers recycle: the merged counts
(and access-log lines) must equal N, and sfmon's store must hold at most live workers +
1 archive files. Servers are stopped by PID. Usage::

    python bench/throughput.py [--duration 3] [--rounds 3] [--connections 16]
    python bench/throughput.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

BENCH = Path(__file__).resolve().parent

_CONF = """\
bind = "127.0.0.1:{port}"
workers = {workers}
worker_class = "sync"
accesslog = None
errorlog = {errorlog!r}
loglevel = "warning"
max_requests = {max_requests}
"""
_SFMON_HOOKS = """\
from sfmon.gunicorn_hooks import child_exit, on_exit, on_starting, post_worker_init, when_ready
"""
_PC_HOOKS = """\
def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One gunicorn serving one variant; stopped by PID."""

    def __init__(
        self, variant: peers.Variant, root: str, *, workers: int = 2, max_requests: int = 0
    ) -> None:
        self.variant = variant
        self.workers_wanted = workers
        self.max_requests = max_requests
        self.dir = os.path.join(root, variant.key.replace("/", "-"))
        self.ctx = peers.Context(self.dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{peers.PATH}"
        conf = _CONF.format(
            port=self.port,
            workers=workers,
            errorlog=os.path.join(self.dir, "gunicorn.log"),
            max_requests=max_requests,
        )
        if variant.namespace is not None:
            conf += _SFMON_HOOKS
        elif variant.key.split("/")[1] in ("pc", "pc-log", "pfe"):
            conf += _PC_HOOKS
        conf_path = os.path.join(self.dir, "gunicorn_bench.conf.py")
        Path(conf_path).write_text(conf)
        env = {
            **os.environ,
            "BENCH_VARIANT": variant.key,
            "BENCH_DIR": self.dir,
            "PROMETHEUS_MULTIPROC_DIR": self.ctx.mp,
            "SFMON_LOGGING": "0",  # the variant configures its own logging (or none)
        }
        self.out = open(os.path.join(self.dir, "stdout.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                conf_path,
                "--pythonpath",
                str(BENCH),
                "peers:gunicorn_app()",
            ],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn for {self.variant.key} exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200 and len(self.workers()) >= 1:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn for {self.variant.key} not ready: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for name in ("stdout.log", "gunicorn.log"):
            try:
                out.append(Path(self.dir, name).read_text()[-2000:])
            except OSError as exc:
                out.append(f"({name}: {exc})")
        return "\n".join(out)

    def workers(self) -> list[Any]:
        import psutil

        try:
            return list(psutil.Process(self.proc.pid).children())
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """CPU (user + system) of the master and its live workers."""
        import psutil

        total = 0.0
        try:
            master = psutil.Process(self.proc.pid)
            procs = [master, *master.children()]
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_rss(self) -> list[int]:
        out = []
        for p in self.workers():
            try:
                out.append(p.memory_info().rss)
            except Exception:
                pass
        return out

    def stop(self) -> None:
        children = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:  # by PID, should any worker outlive its master
            try:
                if child.is_running():
                    os.kill(child.pid, signal.SIGKILL)
            except (OSError, Exception):
                pass
        self.out.close()


def ready(server: Server) -> Server:
    """Wait for *server*; if it died starting (its free port taken meanwhile, say), start
    it once more on another port."""
    try:
        server.wait_ready()
        return server
    except RuntimeError as exc:
        print(f"note: {exc}\nstarting it again", file=sys.stderr)
        server.stop()
        again = Server(
            server.variant,
            os.path.join(os.path.dirname(server.dir), "again"),
            workers=server.workers_wanted,
            max_requests=server.max_requests,
        )
        try:
            again.wait_ready()
        except BaseException:
            again.stop()
            raise
        return again


def wrk(url: str, duration: int, connections: int, threads: int = 2) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(m.group(1)),
        "rps": float(rps.group(1)),
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }


def ab(url: str, n: int, concurrency: int) -> dict[str, int]:
    out = subprocess.run(
        ["ab", "-q", "-n", str(n), "-c", str(concurrency), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    done = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return {
        "complete": int(done.group(1)) if done else -1,
        "failed": int(failed.group(1)) if failed else -1,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def throughput(
    chosen: list[peers.Variant], root: str, duration: int, rounds: int, connections: int
) -> dict[str, Any]:
    servers: list[Server] = []
    results: dict[str, Any] = {}
    try:
        for v in chosen:
            servers.append(Server(v, root))
        sent = {s.variant.key: 0 for s in servers}
        for i, s in enumerate(servers):
            s = servers[i] = ready(s)
            sent[s.variant.key] += 1 + wrk(s.url, 1, connections)["requests"]  # warm-up
        by_key = {s.variant.key: s for s in servers}
        runs: dict[str, list[dict[str, Any]]] = {s.variant.key: [] for s in servers}
        paired: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}

        def measure(s: Server) -> dict[str, Any]:
            cpu0 = s.cpu_seconds()
            res = wrk(s.url, duration, connections)
            res["cpu_us"] = (s.cpu_seconds() - cpu0) / max(res["requests"], 1) * 1e6
            runs[s.variant.key].append(res)
            sent[s.variant.key] += res["requests"]
            return res

        others = [s for s in servers if s.variant.bare_key != s.variant.key]
        for r in range(rounds):
            # Each variant runs right after its bare app, and is compared with that run
            # only: the load of the other tenants of the machine drifts within seconds.
            k = r % max(len(others), 1)
            for s in others[k:] + others[:k]:
                bare = by_key.get(s.variant.bare_key)
                base = measure(bare) if bare is not None else None
                mine = measure(s)
                if base is not None:
                    mine["paired_rps"] = base["rps"]
                    paired.setdefault(s.variant.key, []).append((mine, base))
            if not others:
                for s in servers:
                    measure(s)
        for s in servers:
            key = s.variant.key
            rss = s.worker_rss()
            results[key] = {
                "label": s.variant.label,
                "rps": statistics.median(x["rps"] for x in runs[key]),
                "cpu_us": statistics.median(x["cpu_us"] for x in runs[key]),
                "errors": sum(x["non2xx"] + x["socket_errors"] for x in runs[key]),
                "worker_rss_mib": statistics.mean(rss) / 2**20 if rss else None,
                "runs": runs[key],
            }
            pairs = paired.get(key)
            if pairs:
                results[key]["ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
                results[key]["cpu_ratio"] = statistics.median(
                    a["cpu_us"] / b["cpu_us"] for a, b in pairs
                )
            # wrk counts completed responses; the server may also have served the
            # requests in flight when wrk stopped (at most one per connection and run),
            # and readiness probes (at least one).
            got = peers.counted(s.variant, s.ctx, os.path.join(s.ctx.mp, "sfmon"))
            if got is not None:
                results[key]["counted"] = got["requests"]
                results[key]["wrk_completed"] = sent[key]
                results[key]["in_flight_bound"] = connections * (len(runs[key]) + 1)
    finally:
        for s in servers:
            s.stop()
    return results


def exactness(
    chosen: list[peers.Variant], root: str, n: int, max_requests: int, concurrency: int = 8
) -> dict[str, Any]:
    """ab -n N with worker recycling: counts must equal N exactly."""
    out: dict[str, Any] = {}
    for v in chosen:
        s = Server(v, os.path.join(root, "exact"), max_requests=max_requests)
        try:
            s = ready(s)
            # wait_ready's probe is counted too, once the server has closed it (after the
            # client has its response): wait for it before taking it off.
            store = os.path.join(s.ctx.mp, "sfmon")
            deadline = time.monotonic() + 5
            probe: dict[str, int] = {}
            while time.monotonic() < deadline:
                probe = peers.counted(v, s.ctx, store) or {}
                if probe.get("requests", 0) >= 1 and probe.get("access_lines", 1) >= 1:
                    break
                time.sleep(0.05)
            before = probe.get("requests", 0)
            res = ab(s.url, n, concurrency)
            time.sleep(0.5)  # let the master fold the last exited workers
            got = peers.counted(v, s.ctx, store) or {}
            if v.namespace is not None:
                files = len([f for f in os.listdir(store) if f.endswith(".sfm")])
            else:
                files = len([f for f in os.listdir(s.ctx.mp) if f.endswith(".db")])
            out[v.key] = {
                "label": v.label,
                "sent": n,
                "ab": res,
                "probe_requests": before,  # counted (and logged) before ab: not ab's
                **{k: val - before for k, val in got.items()},
                "store_files": files,
                "live_workers": len(s.workers()),
                "max_requests": max_requests,
            }
        finally:
            s.stop()
    return out


def print_tables(data: dict[str, Any]) -> None:
    if data.get("skipped_all"):
        print(f"\ngunicorn benchmark skipped: {data['skipped_all']}")
        return
    print(
        f"\ngunicorn -w 2 (sync) + wrk -t2 -c{data['connections']} -d{data['duration']}s, "
        f"paired with the bare app's run just before, median of {data['rounds']} rounds:"
    )
    print(
        f"  {'variant':52} {'req/s':>8} {'ratio':>6} {'CPU µs/req':>11} {'ratio':>6} "
        f"{'RSS MiB':>8}"
    )
    for r in data["results"].values():
        rss = r["worker_rss_mib"]
        print(
            f"  {r['label']:52} {r['rps']:8.0f} {r.get('ratio', 1):6.3f} {r['cpu_us']:11.1f} "
            f"{r.get('cpu_ratio', 1):6.3f} {rss if rss is None else format(rss, '8.1f')}"
        )
    for key, why in data["skipped"].items():
        print(f"  {key:52} skipped: {why}")
    for key, e in data.get("exact", {}).items():
        print(
            f"  exactness {key}: sent {e['sent']} (ab complete {e['ab']['complete']}), "
            f"counted {e.get('requests')}, histogram {e.get('histogram')}, "
            f"access lines {e.get('access_lines', '-')}, store files {e['store_files']} "
            f"with {e['live_workers']} live workers (max_requests={e['max_requests']})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--exact-n", type=int, default=4000)
    ap.add_argument("--max-requests", type=int, default=300)
    ap.add_argument("--variants", help="comma-separated keys (default: the gunicorn subset)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    keys = args.variants
    duration, rounds, exact_n, max_req = (
        args.duration,
        args.rounds,
        args.exact_n,
        args.max_requests,
    )
    if args.smoke:
        keys = keys or "trivial/bare,trivial/sfmon-logs"
        duration, rounds, exact_n, max_req = 1, 1, 300, 100
    elif args.quick:
        duration, rounds = 2, 2
    data: dict[str, Any] = {
        "machine": peers.machine_info(),
        "duration": duration,
        "rounds": rounds,
        "connections": args.connections,
        "results": {},
        "skipped": {},
    }
    missing = [tool for tool in ("wrk", "ab") if shutil.which(tool) is None]
    if missing:
        data["skipped_all"] = f"{', '.join(missing)} not installed (Debian: wrk, apache2-utils)"
    else:
        chosen = []
        for v in peers.select(keys, gunicorn=True):
            why = v.missing() or (None if peers.has_gunicorn() else "gunicorn")
            if why:
                data["skipped"][v.key] = f"{why} not installed"
            else:
                chosen.append(v)
        root = tempfile.mkdtemp(prefix="sfmon-bench-gunicorn-")
        try:
            data["results"] = throughput(chosen, root, duration, rounds, args.connections)
            exact = [
                v for v in chosen if v.key in ("trivial/sfmon-logs", "trivial/pc", "flask/pfe")
            ]
            data["exact"] = exactness(exact, root, exact_n, max_req)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    data["load_end"] = peers.load_average()
    print_tables(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
