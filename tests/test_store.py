"""The multiprocess store: exact merges, folding dead workers, corrupt files, caps."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sfmon import merge, metrics, store
from sfmon.compact import fold_dead_workers
from sfmon.merge import HistogramValue, StoreReader

_n = [0]


def fresh(kind: str, *labels: str, **kw: object) -> object:
    """A family with a unique name (families are process-global)."""
    _n[0] += 1
    name = f"t{_n[0]}_{kind}"
    maker = {"counter": metrics.counter, "gauge": metrics.gauge, "histogram": metrics.histogram}
    return maker[kind](name + ("_total" if kind == "counter" else ""), "test", labels, **kw)  # type: ignore[operator]


def in_child(fn: object) -> None:
    """Run *fn* in a forked child (a 'worker') and wait for it to exit."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()  # type: ignore[operator]
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def values(directory: str) -> dict[str, dict[tuple[str, ...], object]]:
    snap = StoreReader(directory).snapshot()
    out: dict[str, dict[tuple[str, ...], object]] = {}
    for name, fam in snap.families.items():
        out[name] = {}
        for labels, v in fam.series.items():
            if isinstance(v, HistogramValue):
                out[name][labels] = (
                    v.count,
                    v.sum,
                    tuple(v.buckets),
                    v.zero_count,
                    tuple(sorted(v.native.items())),
                )
            elif isinstance(v, tuple):
                out[name][labels] = v[0]
            else:
                out[name][labels] = v / store.VALUE_SCALE
    return out


def test_counts_from_several_processes_merge_exactly(store_dir: str) -> None:
    c = fresh("counter", "route")

    c.labels("/a").inc()
    for _ in range(3):
        in_child(lambda: [c.labels("/a").inc() for _ in range(100)])

    assert values(store_dir)[c.name][("/a",)] == 301


def test_fold_keeps_totals_bit_identical_and_removes_dead_files(store_dir: str) -> None:
    c = fresh("counter", "route")
    h = fresh("histogram", "route", native=True)

    def work() -> None:
        for i in range(50):
            c.labels("/x").inc(0.1)
            h.labels("/x").observe(i * 1.37 + 0.001)

    c.labels("/x").inc()
    for _ in range(4):
        in_child(work)
    before = values(store_dir)
    workers_before = [n for n in os.listdir(store_dir) if n.startswith("w-")]

    folded = fold_dead_workers(store_dir)

    after = values(store_dir)
    assert folded == 4
    assert len(workers_before) == 5
    assert [n for n in os.listdir(store_dir) if n.startswith("w-")] == [store.get_writer().name]
    assert after[c.name] == before[c.name]
    assert after[h.name] == before[h.name]
    assert after[h.name][("/x",)][0] == 200  # type: ignore[index]


def test_fold_is_idempotent_when_interrupted_before_unlink(store_dir: str) -> None:
    """A crash between writing the archive and unlinking a folded file never double counts."""
    c = fresh("counter")
    in_child(lambda: c.inc(7))
    dead = [n for n in os.listdir(store_dir) if n.startswith("w-")]
    saved = {n: Path(store_dir, n).read_bytes() for n in dead}
    fold_dead_workers(store_dir)

    for n, data in saved.items():  # the file "survived" the fold
        Path(store_dir, n).write_bytes(data)

    assert values(store_dir)[c.name][()] == 7
    fold_dead_workers(store_dir)
    assert values(store_dir)[c.name][()] == 7
    assert not [n for n in os.listdir(store_dir) if n in saved]


def test_live_gauges_of_dead_workers_disappear_other_modes_stay(store_dir: str) -> None:
    live = fresh("gauge")
    high = fresh("gauge", mode="max")
    recent = fresh("gauge", mode="mostrecent")

    def work() -> None:
        live.inc(5)
        high.set(9)
        recent.set(3)

    live.inc(1)
    high.set(4)
    in_child(work)
    recent.set(11)

    v = values(store_dir)
    assert v[live.name][()] == 1  # the child is dead (reaped): its live value is gone
    assert v[high.name][()] == 9
    assert v[recent.name][()] == 11
    fold_dead_workers(store_dir)
    v = values(store_dir)
    assert (v[live.name][()], v[high.name][()], v[recent.name][()]) == (1, 9, 11)


def test_histogram_buckets_sum_and_count(store_dir: str) -> None:
    h = fresh("histogram", buckets=[1, 10])

    for v in (0.5, 1, 1.5, 10, 11, float("nan")):
        h.observe(v)

    count, total, buckets, _, _ = values(store_dir)[h.name][()]  # type: ignore[misc]
    assert (count, total, buckets) == (5, 24.0, (2, 2, 1))


def test_native_buckets_merge_across_workers_by_index(store_dir: str) -> None:
    h = fresh("histogram", native=True, native_schema=0)

    h.observe(3)  # schema 0: (2, 4] is index 2
    in_child(lambda: [h.observe(v) for v in (3, 0.75, -3, 0.0)])

    _, _, _, zero, native = values(store_dir)[h.name][()]  # type: ignore[misc]
    assert zero == 1
    # keys are index*2 (+1 for negative buckets)
    assert dict(native) == {4: 2, 0: 1, 5: 1}


def test_truncated_and_garbage_files_are_skipped_and_set_aside(store_dir: str) -> None:
    c = fresh("counter")
    c.inc(2)
    in_child(lambda: c.inc(3))
    victim = next(
        n for n in os.listdir(store_dir) if n.startswith("w-") and n != store.get_writer().name
    )
    Path(store_dir, "w-999999-1-aaaaaa.sfm").write_bytes(b"")  # killed at creation
    Path(store_dir, "w-999998-1-bbbbbb.sfm").write_bytes(b"SFMONST1" + b"\xff" * 100)
    data = bytearray(Path(store_dir, victim).read_bytes())
    struct.pack_into("<Q", data, 16, 10**9)  # "used" far beyond the file
    Path(store_dir, victim).write_bytes(bytes(data))

    snap = StoreReader(store_dir).snapshot()

    assert sorted(snap.files_skipped) == sorted(
        ["w-999999-1-aaaaaa.sfm", "w-999998-1-bbbbbb.sfm", victim]
    )
    assert snap.families[c.name].series[()] == 2 * store.VALUE_SCALE
    fold_dead_workers(store_dir)
    snap = StoreReader(store_dir).snapshot()
    assert snap.files_skipped == []
    assert snap.corrupt_total == 3
    assert len([n for n in os.listdir(store_dir) if n.endswith(".corrupt")]) == 3


def test_pid_reuse_is_detected_by_process_start_time(store_dir: str) -> None:
    """A file whose pid now belongs to another process (here: us) counts as dead."""
    c = fresh("counter")
    in_child(lambda: c.inc(4))
    name = next(n for n in os.listdir(store_dir) if n.startswith("w-"))
    data = bytearray(Path(store_dir, name).read_bytes())
    struct.pack_into("<q", data, 24, os.getpid())  # same pid as a live process...
    struct.pack_into("<d", data, 32, 12345.0)  # ...but another start time
    Path(store_dir, name).write_bytes(bytes(data))

    assert StoreReader(store_dir).snapshot().dead == [name]
    assert fold_dead_workers(store_dir) == 1
    assert values(store_dir)[c.name][()] == 4


def test_series_cap_folds_excess_into_overflow_and_counts_it(store_dir: str) -> None:
    c = fresh("counter", "user", max_series=3)

    for i in range(10):
        c.labels(f"u{i}").inc()

    v = values(store_dir)
    assert len(v[c.name]) == 4
    assert v[c.name][("__overflow__",)] == 7
    assert v["sfmon_label_overflow_total"][(c.name,)] >= 7


def test_file_grows_past_initial_size(store_dir: str) -> None:
    c = fresh("counter", "k", max_series=5000)

    for i in range(3000):
        c.labels(f"key-{i:05d}-" + "x" * 40).inc(i)

    v = values(store_dir)[c.name]
    assert len(v) == 3000
    assert v[("key-02999-" + "x" * 40,)] == 2999
    assert os.path.getsize(store.get_writer().path) > store.INITIAL_SIZE


def test_counter_rejects_negative_and_bad_definitions(store_dir: str) -> None:
    c = fresh("counter")

    with pytest.raises(ValueError, match="only increase"):
        c.inc(-1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="invalid metric name"):
        metrics.counter("bad name", "x")
    with pytest.raises(ValueError, match="different definition"):
        metrics.gauge(c.name, "x")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="mode"):
        metrics.gauge("t_mode", "x", mode="avg")
    with pytest.raises(ValueError, match="increasing"):
        metrics.histogram("t_hb", "x", buckets=[3, 1])


def test_fork_gives_the_child_its_own_file(store_dir: str) -> None:
    c = fresh("counter")
    c.inc()
    parent_file = store.get_writer().name
    r, w = os.pipe()

    def child() -> None:
        c.inc()
        os.write(w, store.get_writer().name.encode())

    in_child(child)
    child_file = os.read(r, 200).decode()
    os.close(r)
    os.close(w)

    assert child_file != parent_file
    assert values(store_dir)[c.name][()] == 2


def test_merge_handles_changed_bucket_layouts(store_dir: str) -> None:
    """An archive from a deploy with other buckets merges by bound."""
    hv = HistogramValue((1.0, 10.0))
    hv.buckets = [1, 2, 3]
    merge._merge_other_bounds(hv, (5.0, 10.0), [4, 5, 6])
    assert hv.bounds == (1.0, 5.0, 10.0)
    assert hv.buckets == [1, 4, 7, 9]
