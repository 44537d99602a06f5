"""elk/: Logstash pipeline, Filebeat config, Elasticsearch ILM policies and index
templates, Kibana saved objects and the setup script.

Nothing official can check a Logstash pipeline or Elasticsearch JSON without running
them, so these tests parse every file, check the Logstash pipeline's structure, and check
that every field the configs use is one sfmon (or the example app) really writes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from opsutil import need_demo, running_demo, send_traffic, wait_until
from support import ROOT, http_get

ELK = ROOT / "elk"
PIPELINE = ELK / "logstash" / "pipeline" / "softfactory.conf"
FILEBEAT = ELK / "filebeat" / "filebeat.yml"
ES = ELK / "elasticsearch"
SAVED_OBJECTS = ELK / "kibana" / "saved-objects.ndjson"

# What sfmon writes on every line / on access lines (SPEC section 7).
SFMON_FIELDS = {
    "timestamp",
    "level",
    "logger",
    "message",
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "content_length",
    "latency_ms",
    "user_id",
    "trace_id",
}
# Written only sometimes: time to first byte, client address (opt-in), the exception
# type of a failed request (sfmon/access_log.py) and tracebacks (sfmon/logs.py).
SFMON_OPTIONAL = {"ttfb_ms", "client_addr", "exception", "exc_info"}
# The example app logs auth failures with the client address (examples/softfactory).
APP_FIELDS = {"client_ip"}
# Added by the shippers.
SHIPPER_FIELDS = {"@timestamp", "@metadata", "service", "environment", "tags"}
KNOWN = SFMON_FIELDS | SFMON_OPTIONAL | APP_FIELDS | SHIPPER_FIELDS

RETENTION_DAYS = {"logs": 30, "errors": 90, "audit": 365}


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved_objects() -> list[dict[str, Any]]:
    lines = SAVED_OBJECTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def strip_comments(conf: str) -> str:
    """Drop # comments outside quoted strings (Logstash config syntax)."""
    out = []
    for line in conf.splitlines():
        quote = None
        for i, ch in enumerate(line):
            if quote:
                if ch == quote and line[i - 1] != "\\":
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def without_strings(conf: str) -> str:
    """Blank out quoted strings and /regex/ literals, keeping the structure."""
    conf = re.sub(r'"(?:\\.|[^"\\])*"', '""', conf)
    conf = re.sub(r"'(?:\\.|[^'\\])*'", "''", conf)
    return re.sub(r"=~\s*/(?:\\.|[^/\\])*/", "=~ //", conf)


# --------------------------------------------------------------------- parsing


def test_every_file_parses() -> None:
    files = sorted(p for p in ELK.rglob("*") if p.is_file())
    kinds = {p.suffix for p in files}
    assert {".json", ".yml", ".ndjson", ".conf", ".sh"} <= kinds
    for path in files:
        if path.suffix == ".json":
            assert isinstance(load_json(path), dict), path
        elif path.suffix == ".yml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), path
        elif path.suffix == ".ndjson":
            assert saved_objects()
        elif path.suffix == ".sh":
            result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr


def test_logstash_pipeline_structure() -> None:
    conf = without_strings(strip_comments(PIPELINE.read_text()))
    depth = 0
    for ch in conf:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            assert depth >= 0, "unbalanced } or ]"
    assert depth == 0, "unbalanced { or ["
    sections = re.findall(r"^(input|filter|output)\s*\{", conf, flags=re.M)
    assert sections == ["input", "filter", "output"]

    assert re.search(r"file\s*\{[^}]*codec\s*=>\s*json\s*\n", conf), "file input, json codec"
    text = strip_comments(PIPELINE.read_text())
    assert "json_lines" not in text
    assert re.search(r'path\s*=>\s*\["[^"]*/app\.log\*?"\]', text)
    assert re.search(
        r'date\s*\{\s*match\s*=>\s*\["timestamp",\s*"ISO8601"\]\s*target\s*=>\s*"@timestamp"',
        text,
    )
    for kind in RETENTION_DAYS:
        assert f'index => "softfactory-{kind}-%{{+YYYY.MM.dd}}"' in text


def test_logstash_uses_only_fields_sfmon_writes() -> None:
    text = strip_comments(PIPELINE.read_text())
    refs = set(re.findall(r"(?<!\])\[([@\w]+)\]", without_strings(text)))
    assert refs, "no field references found"
    assert refs <= KNOWN, refs - KNOWN
    assert {"level", "logger"} <= refs
    # Fields named in plugin settings (strings) too.
    assert re.findall(r'match\s*=>\s*\["(\w+)"', text) == ["timestamp"]


def test_filebeat_filestream_with_ndjson() -> None:
    cfg = yaml.safe_load(FILEBEAT.read_text())
    inputs = cfg["filebeat.inputs"]
    assert inputs and all(i["type"] == "filestream" for i in inputs)
    ids = [i["id"] for i in inputs]
    assert len(ids) == len(set(ids))  # filestream needs unique ids
    assert inputs[0]["paths"][0].endswith("/*.log")
    for i in inputs:
        (parser,) = i["parsers"]
        assert parser["ndjson"]["target"] == "" and parser["ndjson"]["add_error_key"]
    (ts,) = [p["timestamp"] for p in cfg["processors"] if "timestamp" in p]
    assert ts["field"] == "timestamp"
    out = cfg["output.elasticsearch"]
    assert out["index"] == "softfactory-logs-%{+yyyy.MM.dd}"
    indices = {i["index"] for i in out["indices"]}
    assert indices == {"softfactory-errors-%{+yyyy.MM.dd}", "softfactory-audit-%{+yyyy.MM.dd}"}
    used = set()
    for cond in out["indices"]:
        for key, body in cond.items():
            if key.startswith("when."):
                used |= set(body)
    assert used <= KNOWN, used - KNOWN


def test_filebeat_timestamp_layout_parses_sfmon_timestamps() -> None:
    """Go layout 2006-01-02T15:04:05Z07:00 accepts sfmon's 2026-02-25T10:30:45.123Z."""
    cfg = yaml.safe_load(FILEBEAT.read_text())
    (ts,) = [p["timestamp"] for p in cfg["processors"] if "timestamp" in p]
    assert ts["layouts"] == ["2006-01-02T15:04:05Z07:00"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in ts["test"])


# --------------------------------------------------------------------- Elasticsearch


def _days(age: str) -> int:
    m = re.fullmatch(r"(\d+)d", age)
    assert m, age
    return int(m.group(1))


def test_ilm_policies_keep_30_90_365_days() -> None:
    policies = {p.stem: load_json(p)["policy"] for p in (ES / "ilm").glob("*.json")}
    assert set(policies) == {f"softfactory-{k}-{d}d" for k, d in RETENTION_DAYS.items()}
    order = ["hot", "warm", "cold", "frozen", "delete"]
    for name, policy in policies.items():
        phases = policy["phases"]
        kind = name.split("-")[1]
        assert phases["delete"]["actions"] == {"delete": {}}
        assert _days(phases["delete"]["min_age"]) == RETENTION_DAYS[kind]
        present = [p for p in order if p in phases]
        assert list(phases) == present, name
        ages = [0 if p == "hot" else _days(phases[p]["min_age"]) for p in present]
        assert ages == sorted(ages), name


def test_index_templates_attach_the_policies_and_sfmon_mappings() -> None:
    component = load_json(ES / "component-template-softfactory-mappings.json")
    props = component["template"]["mappings"]["properties"]
    assert set(props) <= KNOWN, set(props) - KNOWN
    assert set(props) >= SFMON_FIELDS
    assert props["timestamp"]["type"] == "date"
    assert props["status"]["type"] in {"short", "integer"}
    assert props["latency_ms"]["type"] in {"float", "double"}
    assert props["message"]["type"] == "text"
    policies = {p.stem for p in (ES / "ilm").glob("*.json")}
    templates = {p.stem: load_json(p) for p in (ES / "index-templates").glob("*.json")}
    assert set(templates) == {f"softfactory-{k}" for k in RETENTION_DAYS}
    for name, tpl in templates.items():
        assert tpl["index_patterns"] == [f"{name}-*"]
        assert tpl["composed_of"] == ["softfactory-mappings"]
        assert tpl["priority"] > 200  # above the built-in logs-*-* templates
        policy = tpl["template"]["settings"]["index.lifecycle.name"]
        assert policy in policies and policy.startswith(name + "-")


def test_setup_script_installs_every_file() -> None:
    script = (ELK / "setup.sh").read_text()
    assert "/_ilm/policy/" in script and "/_index_template/" in script
    assert "/_component_template/softfactory-mappings" in script
    assert "component-template-softfactory-mappings.json" in script
    assert "kibana/saved-objects.ndjson" in script and "_import?overwrite=true" in script


# --------------------------------------------------------------------- Kibana


def test_saved_objects_are_importable() -> None:
    objs = saved_objects()
    ids = [(o["type"], o["id"]) for o in objs]
    assert len(ids) == len(set(ids))
    views = {o["id"]: o for o in objs if o["type"] == "index-pattern"}
    titles = {v["attributes"]["title"] for v in views.values()}
    assert titles == {f"softfactory-{k}-*" for k in RETENTION_DAYS}
    assert all(v["attributes"]["timeFieldName"] == "@timestamp" for v in views.values())
    for o in objs:
        assert set(o) >= {"id", "type", "attributes", "references"}
        for ref in o["references"]:
            assert ref["type"] == "index-pattern" and ref["id"] in views, (o["id"], ref)


KQL_FIELD_RE = re.compile(r"([@\w.]+)\s*(?::|>=|<=|>|<)")


def test_the_seed_searches_use_sfmon_fields() -> None:
    searches = {o["attributes"]["title"]: o for o in saved_objects() if o["type"] == "search"}
    queries = {}
    for title, o in searches.items():
        source = json.loads(o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
        assert source["indexRefName"] == o["references"][0]["name"]
        assert source["query"]["language"] == "kuery"
        queries[title] = source["query"]["query"]
        fields = set(KQL_FIELD_RE.findall(queries[title]))
        fields |= set(o["attributes"]["columns"])
        fields |= {s[0] for s in o["attributes"]["sort"]}
        assert fields <= KNOWN, (title, fields - KNOWN)
    assert queries["SoftFactory: failed requests"] == "status >= 400"
    assert queries["SoftFactory: slow requests"] == "latency_ms >= 1000"
    assert queries["SoftFactory: auth failures"] == 'message : "Invalid or expired token"'


# --------------------------------------------------------------------- against the demo


@pytest.mark.integration
def test_real_log_lines_have_the_fields_the_configs_use(tmp_path: Path) -> None:
    """Run the demo under gunicorn, read the lines it wrote, and check them against the
    Logstash/Filebeat routing, the mappings and the Kibana searches."""
    need_demo()
    with running_demo(tmp_path / "demo", workers=2) as demo:
        send_traffic(demo.url, rounds=2)
        http_get(demo.url + "/api/coocook/chefs")  # no token -> 401, auth failure
        req_ok = http_get(demo.url + "/api/coocook/chefs", {"Authorization": "Bearer demo_token"})
        assert req_ok[0] == 200
        time.sleep(0.5)
    logs = tmp_path / "demo" / "logs"
    app = wait_until(
        lambda: (logs / "app.log").exists() and logs / "app.log",
        5,
        f"{logs / 'app.log'} (the demo ran with SFMON_LOG_DIR={logs}; SPEC section 7 wants "
        "logs/app.log, access.log and errors.log there)",
    )
    lines = [json.loads(line) for line in app.read_text().splitlines() if line.strip()]
    assert lines
    props = load_json(ES / "component-template-softfactory-mappings.json")["template"]
    props = props["mappings"]["properties"]
    for line in lines:
        assert {"timestamp", "level", "logger", "message", "request_id"} <= set(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    access = [line for line in lines if line["message"].startswith("Request completed: ")]
    assert access
    for line in access:
        assert set(line) >= SFMON_FIELDS - {"trace_id"}
        assert isinstance(line["status"], int) and isinstance(line["latency_ms"], (int, float))
        assert props["status"]["type"] in {"short", "integer"}
    assert any(line["status"] >= 400 for line in access)  # "failed requests" has data
    auth = [line for line in lines if line["message"] == "Invalid or expired token"]
    assert auth and all("client_ip" in line for line in auth)
    errors = [line for line in lines if line["level"] in {"ERROR", "CRITICAL"}]
    assert errors  # /api/error -> 500
    errors_log = logs / "errors.log"
    assert errors_log.exists()
    assert len(errors_log.read_text().splitlines()) >= len(errors)
