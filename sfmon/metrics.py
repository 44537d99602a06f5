"""The public API for recording metrics in sfmon's multiprocess store.

Counters, gauges and histograms made here live in the same per-worker files as the
request metrics, are merged across every worker at scrape, and survive worker
recycling. Names are used as given (a counter's name may end in ``_total``).
"""

from __future__ import annotations

import math
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .store import NATIVE_BLOCK, VALUE_SCALE, Writer, get_writer, labels_tuple

__all__ = [
    "DEFAULT_MAX_SERIES",
    "FAMILIES",
    "GAUGE_MODES",
    "Counter",
    "Gauge",
    "Histogram",
    "counter",
    "gauge",
    "histogram",
]

DEFAULT_MAX_SERIES = 500
GAUGE_MODES = frozenset(
    ("sum", "livesum", "max", "livemax", "min", "livemin", "mostrecent", "livemostrecent")
)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*").fullmatch
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").fullmatch

FAMILIES: dict[str, _Family] = {}
_store_failed = False


def _report_store_failure(exc: BaseException) -> None:
    # Metrics must never break the app: report once, then drop silently.
    global _store_failed
    if not _store_failed:
        _store_failed = True
        print(f"sfmon: metrics store unavailable, values dropped: {exc!r}", file=sys.stderr)


class _Family:
    kind = ""
    nslots = 1

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        if not isinstance(name, str) or not _NAME(name):
            raise ValueError(f"invalid metric name {name!r}")
        if not isinstance(documentation, str):
            raise TypeError(f"documentation of {name} must be a str")
        if isinstance(labelnames, str):
            raise TypeError(f"labelnames of {name} must be a sequence of str, not a str")
        labelnames = tuple(labelnames)
        for label in labelnames:
            if not isinstance(label, str) or not _LABEL(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for metric {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for metric {name}")
        if not isinstance(max_series, int) or max_series < 1:
            raise ValueError(f"max_series of {name} must be a positive int")
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.max_series = max_series
        self._children: dict[tuple[str, ...], Any] = {}
        self._default: Any = None

    def meta(self) -> dict[str, Any]:
        """The metadata written once per file, so any reader can expose the family."""
        return {
            "name": self.name,
            "type": self.kind,
            "help": self.documentation,
            "labels": list(self.labelnames),
        }

    def _same(self, other: _Family) -> bool:
        return other.meta() == self.meta()

    def _child(self, values: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def labels(self, *values: object, **named: object) -> Any:
        """Return the child for one set of label values (positional or by name).

        .. code-block:: python

            payments_failed.labels("card_declined").inc()
        """
        if named:
            if values:
                raise ValueError("pass label values either positionally or by name")
            try:
                values = tuple(named[n] for n in self.labelnames)
            except KeyError as exc:
                raise ValueError(f"missing label {exc} for metric {self.name}") from None
            if len(named) != len(self.labelnames):
                raise ValueError(f"unexpected labels for metric {self.name}")
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes {len(self.labelnames)} label values, got {len(values)}"
            )
        key = labels_tuple(values)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, self._child(key))
        return child

    def _unlabelled(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        if self._default is None:
            self._default = self._child(())
        return self._default


class _Child:
    __slots__ = ("_slot", "_writer", "family", "values")

    def __init__(self, family: _Family, values: tuple[str, ...]) -> None:
        self.family = family
        self.values = values
        self._writer: Writer | None = None
        self._slot = 0

    def _resolve(self) -> Writer | None:
        try:
            w = get_writer()
            if w is not self._writer:
                self._slot = w.series_slot(self.family, self.values)
                self._writer = w
            return w
        except Exception as exc:
            _report_store_failure(exc)
            return None


class _CounterChild(_Child):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Add *amount* (≥ 0; resolution 1/65536)."""
        if not amount >= 0:
            raise ValueError(f"counter {self.family.name} can only increase, got {amount!r}")
        if amount == math.inf:
            raise ValueError(f"counter {self.family.name} cannot add infinity")
        w = self._resolve()
        if w is not None:
            with w.lock:
                w.q[self._slot] += round(amount * VALUE_SCALE)


class Counter(_Family):
    """A monotonically increasing count, summed over workers (dead ones included).

    .. code-block:: python

        failed = sfmon.counter("softfactory_payments_failed_total", "Failed payments")
        failed.inc()
    """

    kind = "counter"
    nslots = 1

    def _child(self, values: tuple[str, ...]) -> _CounterChild:
        return _CounterChild(self, values)

    def inc(self, amount: float = 1.0) -> None:
        """Add *amount* to the unlabelled counter."""
        self._unlabelled().inc(amount)


class _GaugeChild(_Child):
    __slots__ = ()

    def set(self, value: float) -> None:
        """Set the gauge (and note the time, for the ``mostrecent`` modes)."""
        w = self._resolve()
        if w is not None:
            with w.lock:
                w.d[self._slot] = float(value)
                w.d[self._slot + 1] = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add *amount* (may be negative)."""
        w = self._resolve()
        if w is not None:
            with w.lock:
                w.d[self._slot] += amount
                w.d[self._slot + 1] = time.time()

    def dec(self, amount: float = 1.0) -> None:
        """Subtract *amount*."""
        self.inc(-amount)

    def set_to_current_time(self) -> None:
        """Set the gauge to the current Unix time."""
        self.set(time.time())


class Gauge(_Family):
    """A value that goes up and down, combined over workers by *mode*.

    Modes: ``sum``/``max``/``min``/``mostrecent`` keep dead workers' last values;
    the ``live*`` variants (default ``livesum``) drop a worker's value when it exits.

    .. code-block:: python

        backup = sfmon.gauge("softfactory_last_backup_timestamp_seconds",
                             "Last backup", mode="max")
        backup.set_to_current_time()
    """

    kind = "gauge"
    nslots = 2

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        mode: str = "livesum",
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__(name, documentation, labelnames, max_series=max_series)
        if mode not in GAUGE_MODES:
            raise ValueError(f"mode of {name} must be one of {sorted(GAUGE_MODES)}, not {mode!r}")
        self.mode = mode

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "mode": self.mode}

    def _child(self, values: tuple[str, ...]) -> _GaugeChild:
        return _GaugeChild(self, values)

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled gauge."""
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from the unlabelled gauge."""
        self._unlabelled().dec(amount)

    def set_to_current_time(self) -> None:
        """Set the unlabelled gauge to the current Unix time."""
        self._unlabelled().set_to_current_time()


class _HistogramChild(_Child):
    __slots__ = ()

    def observe(self, value: float) -> None:
        """Record one observation (NaN is ignored)."""
        if value != value:
            return
        family: Histogram = self.family  # type: ignore[assignment]
        w = self._resolve()
        if w is None:
            return
        s = self._slot
        bucket = bisect_left(family.bounds, value)
        block = -1
        native = family.indexer
        if native is not None and not -family.zero_threshold <= value <= family.zero_threshold:
            if value > 0:
                idx, sign = native(value), 1
            else:
                idx, sign = native(-value), -1
            block = w.blocks.get((s, sign, idx >> 4), -1)
            if block < 0:
                block = w.block_slot(s, sign, idx // NATIVE_BLOCK)
            block += idx & (NATIVE_BLOCK - 1)
        with w.lock:
            q = w.q
            q[s] += round(value * VALUE_SCALE)
            q[s + 2 + bucket] += 1
            if native is not None:
                if block < 0:
                    q[s + 1] += 1
                else:
                    q[block] += 1


DEFAULT_BUCKETS_MS = (5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)


def validate_buckets(name: str, buckets: Iterable[float]) -> tuple[float, ...]:
    """Return sorted finite bucket bounds, or raise ``ValueError`` naming *name*."""
    try:
        bounds = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    bounds = tuple(b for b in bounds if b != math.inf)
    if not bounds:
        raise ValueError(f"{name} needs at least one finite bound")
    if any(b != b or b == -math.inf for b in bounds):
        raise ValueError(f"{name} must not contain NaN or -inf")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{name} must be strictly increasing")
    return bounds


class Histogram(_Family):
    """Observations in classic buckets and, optionally, native (exponential) buckets.

    :param buckets: classic upper bounds (``+Inf`` is implied).
    :param native: also keep native buckets (exposed over protobuf only).
    :param native_schema: resolution, -4…8 (3: buckets ~9% wide).
    :param native_zero_threshold: ``|v|`` at or below this counts in the zero bucket.
    :param native_max_buckets: at exposition, the schema is reduced until at most
        this many buckets are populated.

    .. code-block:: python

        sizes = sfmon.histogram("upload_bytes", "Upload sizes", buckets=[1e3, 1e6])
        sizes.observe(5120)
    """

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS_MS,
        native: bool = False,
        native_schema: int = 3,
        native_zero_threshold: float = 2.0**-128,
        native_max_buckets: int = 160,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__(name, documentation, labelnames, max_series=max_series)
        if "le" in self.labelnames:
            raise ValueError(f"histogram {name} must not use the label 'le'")
        self.bounds = validate_buckets(f"buckets of {name}", buckets) + (math.inf,)
        self.nslots = 2 + len(self.bounds)
        if not isinstance(native, bool):
            raise TypeError(f"native of {name} must be a bool")
        if not isinstance(native_schema, int) or not -4 <= native_schema <= 8:
            raise ValueError(f"native_schema of {name} must be an int in -4..8")
        if not (isinstance(native_zero_threshold, (int, float)) and native_zero_threshold >= 0):
            raise ValueError(f"native_zero_threshold of {name} must be a number >= 0")
        if not isinstance(native_max_buckets, int) or native_max_buckets < 1:
            raise ValueError(f"native_max_buckets of {name} must be a positive int")
        self.native = native
        self.native_schema = native_schema
        self.zero_threshold = float(native_zero_threshold)
        self.native_max_buckets = native_max_buckets
        self.indexer: Callable[[float], int] | None = None
        if native:
            from .native import make_indexer

            self.indexer = make_indexer(native_schema)

    def meta(self) -> dict[str, Any]:
        meta = {**super().meta(), "buckets": list(self.bounds[:-1])}
        if self.native:
            meta["native"] = {
                "schema": self.native_schema,
                "zero_threshold": self.zero_threshold,
                "max_buckets": self.native_max_buckets,
            }
        return meta

    def _child(self, values: tuple[str, ...]) -> _HistogramChild:
        return _HistogramChild(self, values)

    def observe(self, value: float) -> None:
        """Record one observation in the unlabelled histogram."""
        self._unlabelled().observe(value)


def _register(cls: type[_Family], name: str, *args: Any, **kwargs: Any) -> Any:
    family = cls(name, *args, **kwargs)
    existing = FAMILIES.get(name)
    if existing is not None:
        if type(existing) is cls and existing._same(family):
            return existing
        raise ValueError(f"metric {name} is already registered with a different definition")
    FAMILIES[name] = family
    return family


def counter(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    max_series: int = DEFAULT_MAX_SERIES,
) -> Counter:
    """Create (or return the identical existing) counter in sfmon's store.

    :raises ValueError: bad name or labels, or the name is taken by another definition.

    .. code-block:: python

        failed = sfmon.counter("softfactory_payments_failed_total", "Failed payments",
                               ["reason"])
        failed.labels("card_declined").inc()
    """
    result: Counter = _register(Counter, name, documentation, labelnames, max_series=max_series)
    return result


def gauge(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    mode: str = "livesum",
    max_series: int = DEFAULT_MAX_SERIES,
) -> Gauge:
    """Create (or return the identical existing) gauge; see :class:`Gauge` for modes.

    .. code-block:: python

        sfmon.gauge("softfactory_active_users", "Active users", mode="mostrecent").set(42)
    """
    result: Gauge = _register(
        Gauge, name, documentation, labelnames, mode=mode, max_series=max_series
    )
    return result


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    **options: Any,
) -> Histogram:
    """Create (or return the identical existing) histogram; options as :class:`Histogram`.

    .. code-block:: python

        lat = sfmon.histogram("db_query_ms", "DB query time", ["table"], native=True)
        lat.labels("users").observe(3.2)
    """
    result: Histogram = _register(Histogram, name, documentation, labelnames, **options)
    return result


label_overflow = counter(
    "sfmon_label_overflow_total",
    "Label sets folded into the __overflow__ series because a metric hit its cap.",
    ["metric"],
)
request_ids_rejected = counter(
    "sfmon_request_ids_rejected_total",
    "Inbound request ids refused as malformed and replaced by a new id.",
)
