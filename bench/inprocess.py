"""In-process CPU per request of every variant (``bench/peers.py``), interleaved.

Each app is driven like a sync server drives it (call, iterate the body, close), with
``time.process_time``; every repeat runs all variants one after the other, and the
median of the repeats is reported with its difference and ratio to the bare app of
the same base (trivial WSGI app or Flask). Afterwards each variant's own store is read
back: the counts must equal the requests driven. Usage::

    python bench/inprocess.py [--n 20000] [--repeats 7] [--variants trivial,flask/pfe]
    python bench/inprocess.py --smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers


def run(
    n: int, repeats: int, keys: str | None, warmup: int, budget: float = 0.25
) -> dict[str, Any]:
    machine = peers.machine_info()
    tmp = tempfile.mkdtemp(prefix="sfmon-bench-inproc-")
    ctx = peers.prepare_environment(tmp)
    try:
        from sfmon import store

        store.configure_directory(f"{ctx.mp}/sfmon")
        chosen: list[peers.Variant] = []
        skipped: dict[str, str] = {}
        apps: dict[str, Any] = {}
        for v in peers.select(keys):
            missing = v.missing()
            if missing:
                skipped[v.key] = f"{missing} not installed"
                continue
            apps[v.key] = v.build(ctx)
            chosen.append(v)
        sent = dict.fromkeys(apps, 0)
        size: dict[str, int] = {}
        for v in chosen:
            v.activate(ctx)
            cost = peers.drive(apps[v.key], warmup) / warmup
            sent[v.key] += warmup
            # About *budget* CPU seconds per sample: the slow peers (100-300 µs per
            # request) get fewer requests than the cheap variants, never under 1000.
            size[v.key] = max(min(n, 1000), min(n, int(budget / max(cost, 1e-9))))
        samples: dict[str, list[float]] = {v.key: [] for v in chosen}
        for r in range(repeats):
            # Interleaved, in a rotating order: noise from other tenants of the machine
            # hits all variants alike, and no variant always runs first.
            k = r % len(chosen)
            for v in chosen[k:] + chosen[:k]:
                v.activate(ctx)
                m = size[v.key]
                samples[v.key].append(peers.drive(apps[v.key], m) / m * 1e6)
                sent[v.key] += m
        import logging

        logging.shutdown()  # flush the log files before counting their lines
        results: dict[str, Any] = {}
        for v in chosen:
            med = statistics.median(samples[v.key])
            results[v.key] = {
                "label": v.label,
                "us": med,
                "n": size[v.key],
                "samples": samples[v.key],
            }
        for v in chosen:
            bare = samples.get(v.bare_key)
            if bare is not None:
                # Paired with the bare app's sample of the same repeat, then the median:
                # steadier than the difference of two medians on a shared machine.
                mine = samples[v.key]
                results[v.key]["over_us"] = statistics.median(a - b for a, b in zip(mine, bare))
                results[v.key]["ratio"] = statistics.median(a / b for a, b in zip(mine, bare))
            got = peers.counted(v, ctx)
            if got is not None:
                results[v.key]["exact"] = {"sent": sent[v.key], **got}
        return {
            "machine": machine,
            "load_end": peers.load_average(),
            "n": n,
            "repeats": repeats,
            "results": results,
            "skipped": skipped,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(data: dict[str, Any]) -> None:
    print(
        f"\nIn-process CPU per request, µs (n ≤ {data['n']} per sample, median of "
        f"{data['repeats']}):"
    )
    print(f"  {'variant':52} {'µs/req':>8} {'over bare':>10} {'ratio':>6}  exact")
    for r in data["results"].values():
        exact = r.get("exact")
        ok = ""
        if exact:
            vals = [exact[k] for k in ("requests", "histogram", "access_lines") if k in exact]
            ok = "yes" if all(x == exact["sent"] for x in vals) else f"NO {exact}"
        print(
            f"  {r['label']:52} {r['us']:8.2f} {r.get('over_us', 0):10.2f} "
            f"{r.get('ratio', 1):6.2f}  {ok}"
        )
    for key, why in data["skipped"].items():
        print(f"  {key:52} skipped: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="requests per variant per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="CPU seconds per sample (caps n for slow variants)",
    )
    ap.add_argument("--variants", help="comma-separated keys or bases (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    n, repeats, warmup = args.n, args.repeats, 2000
    if args.smoke:
        n, repeats, warmup = 300, 2, 50
    elif args.quick:
        n, repeats = 5000, 5
    data = run(n, repeats, args.variants, warmup, 0.01 if args.smoke else args.budget)
    print_table(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
