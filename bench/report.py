"""Print the Performance table (Markdown) from a results directory of ``bench/run``.

Reads ``inprocess.json``, ``throughput.json``, ``scrape.json`` and ``memory.json`` (any
may be missing) and prints one table per variant, the scrape and store figures, and the
targets met or missed. Usage::

    python bench/report.py bench/results/<timestamp>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(directory: Path, name: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((directory / f"{name}.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def fmt(value: Any, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def main_table(inp: dict[str, Any], thr: dict[str, Any], mem: dict[str, Any]) -> list[str]:
    ir, tr, mr = inp.get("results", {}), thr.get("results", {}), mem.get("results", {})
    keys = (
        list(ir) + [k for k in tr if k not in ir] + [k for k in mr if k not in ir and k not in tr]
    )
    per = f"{mem['n'] // 1000}k" if mem.get("n") else "n"
    lines = [
        "| variant | µs/req | over bare µs | × bare | req/s (gunicorn -w 2) | × bare "
        f"| server CPU µs/req | × bare | RSS growth / {per} req | exact |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for key in keys:
        i, t, m = ir.get(key, {}), tr.get(key, {}), mr.get(key, {})
        label = i.get("label") or t.get("label") or m.get("label") or key
        exact = ""
        e = i.get("exact")
        if e:
            vals = [e[k] for k in ("requests", "histogram", "access_lines") if k in e]
            exact = "yes" if all(x == e["sent"] for x in vals) else "**no**"
        growth = m.get("growth_kib")
        lines.append(
            f"| {label} | {fmt(i.get('us'), '.2f')} | {fmt(i.get('over_us'), '+.2f')} "
            f"| {fmt(i.get('ratio'), '.2f')} | {fmt(t.get('rps'), ',.0f')} "
            f"| {fmt(t.get('ratio'), '.3f')} | {fmt(t.get('cpu_us'), '.0f')} "
            f"| {fmt(t.get('cpu_ratio'), '.2f')} "
            f"| {fmt(growth, '.0f')}{'' if growth is None else ' KiB'} | {exact} |"
        )
    return lines


def scrape_table(sc: dict[str, Any]) -> list[str]:
    if not sc.get("results"):
        return []
    lines = [
        "",
        f"Scrape time (text exposition, ms, wall-clock median of {sc['repeats']}) against dead "
        "workers; sfmon folds them into one archive as gunicorn's `child_exit` does, "
        "prometheus_client keeps their files:",
        "",
        "| dead workers × series | sfmon | × no dead | sfmon unfolded | fold / worker "
        "| sfmon files | prometheus_client | × no dead | its files |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sc["results"]:
        lines.append(
            f"| {r['dead']} × {r['series']} | {r['sfmon_ms']:.2f} | {r['sfmon_vs_no_dead']:.2f} "
            f"| {r['sfmon_unfolded_ms']:.1f} | {r['sfmon_fold_ms_per_worker']:.2f} "
            f"| {r['sfmon_files']} | {r['pc_ms']:.1f} | {r['pc_vs_no_dead']:.1f} | {r['pc_files']} |"
        )
    return lines


def extra_lines(thr: dict[str, Any], mem: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for e in thr.get("exact", {}).values():
        lines.append(
            f"- exactness under gunicorn ({e['label']}, `--max-requests {e['max_requests']}`, "
            f"ab -n {e['sent']}): counted {e.get('requests')}, histogram count "
            f"{e.get('histogram')}, access lines {e.get('access_lines', '–')}; "
            f"{e['store_files']} store files with {e['live_workers']} live workers"
        )
    for r in thr.get("results", {}).values():
        if "counted" in r:
            extra = r["counted"] - r["wrk_completed"]
            ok = 0 <= extra <= r.get("in_flight_bound", extra)
            lines.append(
                f"- {r['label']} under wrk: server counted {r['counted']}, wrk completed "
                f"{r['wrk_completed']} (+{extra}: requests in flight when wrk stopped, "
                f"{'within' if ok else '**outside**'} the bound of one per connection and run)"
            )
    sb = mem.get("store_bytes")
    if sb:
        for who in ("sfmon", "prometheus_client"):
            vals = ", ".join(f"{k} {v:.0f}" for k, v in sb[who].items() if k != "error")
            lines.append(f"- store bytes per series, {who}: {vals}")
    return lines


def _paired_rps(tr: dict[str, Any], key: str) -> list[tuple[dict[str, Any], float]]:
    """(run, rps of the bare run just before it) for each round of *key*."""
    out = []
    for run in tr.get(key, {}).get("runs", []):
        if "paired_rps" in run:
            out.append((run, run["paired_rps"]))
    return out


def targets(
    inp: dict[str, Any], thr: dict[str, Any], sc: dict[str, Any], mem: dict[str, Any]
) -> list[str]:
    out: list[str] = []

    def check(name: str, value: float | None, limit: float, unit: str, upper: bool = True) -> None:
        if value is None:
            out.append(f"- {name}: not measured")
            return
        ok = value <= limit if upper else value >= limit
        by = abs(value - limit)
        verdict = "met" if ok else f"**missed** by {by:.2f}{unit}"
        margin = f" (margin {by:.2f}{unit})" if ok else ""
        out.append(
            f"- {name}: {value:.2f}{unit} vs {'≤' if upper else '≥'} {limit}{unit}: {verdict}{margin}"
        )

    ir = inp.get("results", {})
    for key in ("trivial/sfmon", "trivial/sfmon-classic"):
        check(f"in-process, {key} over bare", ir.get(key, {}).get("over_us"), 2.0, " µs")
    for key in ("trivial/sfmon-access", "trivial/sfmon-logs"):
        check(f"in-process, {key} over bare", ir.get(key, {}).get("over_us"), 12.0, " µs")
    tr = thr.get("results", {})
    for key, limit in (
        ("trivial/sfmon", 0.90),
        ("trivial/sfmon-access", 0.90),
        ("trivial/sfmon-logs", 0.90),
        ("flask/sfmon", 0.95),
        ("flask/sfmon-logs", 0.95),
    ):
        r = tr.get(key, {})
        check(f"gunicorn req/s, {key} × bare", r.get("ratio"), limit, "", upper=False)
        if r.get("cpu_ratio") is not None:
            ratios = ", ".join(f"{a['rps'] / b:.2f}" for a, b in _paired_rps(tr, key))
            out[-1] += (
                (f" — per round: {ratios};" if ratios else " —")
                + f" server CPU per request × {r['cpu_ratio']:.2f}"
                + f" (requests/s if CPU-bound: × {1 / r['cpu_ratio']:.2f})"
            )
    for r in sc.get("results", []):
        if r["dead"] == 200 and r["series"] == 200:
            check("scrape, 200 dead × 200 series", r["sfmon_ms"], 20.0, " ms")
            check("scrape, 200 dead × 200 series × no dead", r["sfmon_vs_no_dead"], 1.2, "")
    for key, e in thr.get("exact", {}).items():
        if key.split("/")[1].startswith("sfmon"):
            check(
                f"store files after recycling ({key}) ≤ live workers + 1",
                e["store_files"],
                e["live_workers"] + 1,
                "",
            )
            ok = all(
                e.get(k, e["sent"]) == e["sent"] for k in ("requests", "histogram", "access_lines")
            )
            out.append(
                f"- exact counts under gunicorn with recycling ({key}): {'met' if ok else '**missed**'}"
            )
    for r in sc.get("results", []):
        if r["sfmon_files"] > 1:
            out.append(
                f"- store files after folding {r['dead']} dead: {r['sfmon_files']} (**missed**)"
            )
    growths = {k: v.get("growth_kib") for k, v in mem.get("results", {}).items() if "/sfmon" in k}
    if growths:
        worst = max(growths, key=lambda k: growths[k] or 0)
        check(
            f"RSS growth over {mem['n']} requests (worst sfmon variant: {worst})",
            (growths[worst] or 0) / 1024,
            1.0,
            " MiB",
        )
    e_in = [v.get("exact") for v in ir.values() if v.get("exact")]
    if e_in:
        ok = all(
            all(
                x == e["sent"]
                for x in (e["requests"], e["histogram"], e.get("access_lines", e["sent"]))
            )
            for e in e_in
        )
        out.append(
            f"- exact counts in-process (every variant with a store): {'met' if ok else '**missed**'}"
        )
    return out


def machine(datas: list[dict[str, Any]]) -> list[str]:
    m = next((d["machine"] for d in datas if d.get("machine")), None)
    if not m:
        return []
    loads = []
    for name, d in zip(("in-process", "gunicorn", "scrape", "memory"), datas):
        if d.get("machine"):
            end = d.get("load_end")
            span = f"{d['machine']['loadavg'][0]}" + (f"→{end[0]}" if end else "")
            loads.append(f"{name} {span}")
    return [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['implementation']} {m['python']}; "
        f"1-minute load average at the start→end of each part: {', '.join(loads)} "
        "(other tenants share the machine)."
    ]


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    inp, thr = load(directory, "inprocess"), load(directory, "throughput")
    sc, mem = load(directory, "scrape"), load(directory, "memory")
    lines = ["", "## Performance", ""]
    lines += machine([inp, thr, sc, mem])
    lines.append("")
    if inp:
        lines.append(
            f"In-process: CPU µs per request driven like a sync server (up to {inp['n']} "
            f"requests per sample, median of {inp['repeats']} interleaved samples; differences "
            f"and ratios paired per sample). gunicorn: `-w 2` sync, `wrk -t2 "
            f"-c{thr.get('connections', '?')} -d{thr.get('duration', '?')}s` on the same 2 cores, "
            f"each variant's run paired with a run of its bare app just before, median of "
            f"{thr.get('rounds', '?')} rounds. RSS: a forked worker serving requests in-process."
        )
        lines.append("")
    lines += main_table(inp, thr, mem)
    if thr.get("skipped_all"):
        lines.append(f"\ngunicorn benchmark skipped: {thr['skipped_all']}")
    skipped = {**inp.get("skipped", {}), **thr.get("skipped", {}), **mem.get("skipped", {})}
    if skipped:
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    lines += scrape_table(sc)
    extra = extra_lines(thr, mem)
    if extra:
        lines += ["", *extra]
    lines += ["", "### Targets", "", *targets(inp, thr, sc, mem)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
