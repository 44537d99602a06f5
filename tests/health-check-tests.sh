#!/usr/bin/env bash
# SoftFactory health endpoint smoke test (seed section 9), asserting status codes and keys.
#
#   tests/health-check-tests.sh                          # http://localhost:8000
#   BASE_URL=http://127.0.0.1:8001 tests/health-check-tests.sh
#
# Environment:
#   BASE_URL        server root (default http://localhost:8000)
#   METRICS_PREFIX  endpoint prefix (default /api/metrics)
#   METRICS_TOKEN   bearer token, when /summary, /errors and /prometheus are protected
#
# Needs curl and python3 (for the JSON checks). Exits 0 when every check passes,
# 1 when any fails (each failure is printed), 2 when the server cannot be reached.
set -uo pipefail

BASE_URL="${BASE_URL:-http://localhost:8000}"
PREFIX="${METRICS_PREFIX:-/api/metrics}"
URL="${BASE_URL%/}${PREFIX}"
AUTH=()
if [ -n "${METRICS_TOKEN:-}" ]; then
    AUTH=(-H "Authorization: Bearer ${METRICS_TOKEN}")
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
PASSED=0

pass() { PASSED=$((PASSED + 1)); echo "  ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL $*"; }

# fetch METHOD PATH [curl args...]: body -> $WORK/body, headers -> $WORK/headers,
# status -> $STATUS
fetch() {
    local method="$1" path="$2"
    shift 2
    STATUS="$(curl -sS -o "$WORK/body" -D "$WORK/headers" -w '%{http_code}' \
        -X "$method" --max-time 10 "$@" "${URL}${path}")" || STATUS="000"
}

expect_status() { # name expected
    if [ "$STATUS" = "$2" ]; then pass "$1: HTTP $STATUS"; else fail "$1: HTTP $STATUS, expected $2"; fi
}

expect_header() { # name header-regex
    if grep -qiE "$2" "$WORK/headers"; then pass "$1: header /$2/"; else fail "$1: no header /$2/"; fi
}

# expect_json NAME CHECK...: each CHECK is "dotted.key" (must exist) or
# "dotted.key=json-value" (must be equal), checked by python3 on $WORK/body.
expect_json() {
    local name="$1"
    shift
    local out
    if out="$(python3 - "$WORK/body" "$@" <<'PY'
import json, sys

with open(sys.argv[1], encoding="utf-8") as f:
    try:
        doc = json.load(f)
    except ValueError as exc:
        print(f"body is not JSON: {exc}")
        sys.exit(1)
bad = []
for check in sys.argv[2:]:
    key, _, want = check.partition("=")
    node = doc
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            bad.append(f"missing key {key}")
            break
    else:
        if want and node != json.loads(want):
            bad.append(f"{key} is {json.dumps(node)}, expected {want}")
        elif key.endswith("timestamp") and not (isinstance(node, str) and node.endswith("Z")):
            bad.append(f"{key} is not UTC ISO 8601 with Z: {node!r}")
print("; ".join(bad))
sys.exit(1 if bad else 0)
PY
)"; then
        pass "$name: keys $*"
    else
        fail "$name: $out"
    fi
}

echo "Testing SoftFactory health endpoints at ${URL}"

fetch GET /live
if [ "$STATUS" = "000" ]; then
    echo "cannot reach ${URL}/live" >&2
    exit 2
fi

echo "Liveness probe (/live):"
expect_status live 200
expect_header live '^content-type: application/json'
expect_json live alive=true timestamp pid

echo "Health check (/health):"
fetch GET /health
expect_status health 200
expect_header health '^x-request-id: [A-Za-z0-9]'
expect_json health 'status="healthy"' timestamp uptime_seconds 'database="healthy"' \
    'api="ok"' checks

echo "Readiness probe (/ready):"
fetch GET /ready
expect_status ready 200
expect_json ready ready=true timestamp

echo "Metrics summary (/summary):"
fetch GET /summary "${AUTH[@]}"
expect_status summary 200
expect_json summary timestamp uptime.seconds uptime.human_readable system.cpu_percent \
    system.memory.rss_mb system.memory.vms_mb system.memory.percent system.process_id \
    application.requests_total application.errors_total application.error_rate \
    'database.status="healthy"' database.stats

echo "Error statistics (/errors):"
fetch GET /errors "${AUTH[@]}"
expect_status errors 200
expect_json errors timestamp requests_total errors_total error_rate_percent

echo "Prometheus format (/prometheus):"
# One application request first: request families have samples only after traffic
# (any status counts, a 404 too; the built-in endpoints are not counted).
curl -sS -o /dev/null --max-time 10 "${BASE_URL%/}/" || true
fetch GET /prometheus "${AUTH[@]}"
expect_status prometheus 200
expect_header prometheus '^content-type: text/plain; version=0\.0\.4'
for family in softfactory_up softfactory_uptime_seconds softfactory_requests_total \
    softfactory_request_latency_ms softfactory_memory_rss_mb softfactory_cpu_percent \
    softfactory_database_status; do
    if grep -q "^# TYPE ${family} " "$WORK/body"; then
        pass "prometheus: # TYPE ${family}"
    else
        fail "prometheus: no # TYPE ${family}"
    fi
done
if grep -qE '^softfactory_up(\{[^}]*\})? 1(\.0)?$' "$WORK/body"; then
    pass "prometheus: softfactory_up 1"
else
    fail "prometheus: softfactory_up is not 1"
fi

echo "Method not allowed (POST /health):"
fetch POST /health
expect_status "POST health" 405
expect_header "POST health" '^allow: .*GET'

echo
if [ "$FAILED" -eq 0 ]; then
    echo "All ${PASSED} checks passed."
    exit 0
fi
echo "${FAILED} of $((PASSED + FAILED)) checks failed." >&2
exit 1
