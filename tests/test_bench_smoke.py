"""The benchmark suite runs: every bench script with tiny sizes (``--smoke``), then the report.

Runs in the test environment, without the peers (prometheus-flask-exporter,
OpenTelemetry): their variants must be skipped cleanly, not fail. The gunicorn part
needs wrk and ab; without them it reports itself skipped.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    for name in ("inprocess", "throughput", "scrape", "memory"):
        run(f"{name}.py", "--smoke", "--json", str(out / f"{name}.json"))
    return out


def test_inprocess_counts_are_exact_and_peers_skip(results: Path) -> None:
    data = json.loads((results / "inprocess.json").read_text())
    res = data["results"]
    assert {"trivial/bare", "trivial/sfmon", "trivial/sfmon-logs"} <= set(res)
    for key, r in res.items():
        assert r["us"] > 0, key
        exact = r.get("exact")
        if exact:
            assert exact["requests"] == exact["sent"], key
            assert exact["histogram"] == exact["sent"], key
            assert exact.get("access_lines", exact["sent"]) == exact["sent"], key
    for key, why in data["skipped"].items():
        assert "not installed" in why, key
    for module, key in (
        ("prometheus_flask_exporter", "flask/pfe"),
        ("opentelemetry", "trivial/otel"),
    ):
        if importlib.util.find_spec(module) is None:
            assert key in data["skipped"] and key not in res
        else:
            assert key in res


def test_throughput_runs_or_skips(results: Path) -> None:
    data = json.loads((results / "throughput.json").read_text())
    if data.get("skipped_all"):
        pytest.skip(data["skipped_all"])
    assert data["results"]["trivial/bare"]["rps"] > 0
    exact = data["exact"]["trivial/sfmon-logs"]
    assert exact["requests"] == exact["histogram"] == exact["access_lines"] == exact["sent"]
    assert exact["store_files"] <= exact["live_workers"] + 1


def test_scrape_folds_to_one_archive(results: Path) -> None:
    data = json.loads((results / "scrape.json").read_text())
    for r in data["results"]:
        assert r["sfmon_files"] == 1
        assert r["pc_files"] >= r["dead"]


def test_memory_and_store_bytes(results: Path) -> None:
    data = json.loads((results / "memory.json").read_text())
    assert "trivial/sfmon" in data["results"]
    assert all("error" not in r for r in data["results"].values())
    assert data["store_bytes"]["sfmon"]["counter"] > 0


def test_report_prints_the_table(results: Path) -> None:
    out = run("report.py", str(results))
    assert "## Performance" in out
    assert "| trivial: bare |" in out
    assert "### Targets" in out
