"""Monitor options: defaults, ``SFMON_*`` environment variables, validation.

This is the only place that reads the environment for options. Precedence: an
explicit keyword argument, then ``SFMON_<OPTION>``, then the default. Bad values
raise ``ValueError``/``TypeError`` naming the option, at construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .metrics import DEFAULT_BUCKETS_MS

__all__ = ["Settings"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name} must be a boolean (1/0, true/false), not {raw!r}")


def _env_int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None


def _env_float(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None


def _env_floats(name: str, raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, not {raw!r}") from None


def _env_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in raw.split(",") if x.strip())


def _env_str(name: str, raw: str) -> str:
    return raw


def _opt(default: Any, env: Callable[[str, str], Any] | None = _env_str) -> Any:
    return field(default=default, metadata={"env": env})


@dataclass(frozen=True)
class Settings:
    """Every option of :class:`sfmon.Monitor`, validated.

    .. code-block:: python

        settings = Settings.build({"namespace": "shop"}, os.environ)
    """

    namespace: str = _opt("softfactory")
    prefix: str = _opt("/api/metrics")
    request_id_header: str = _opt("X-Request-Id")
    buckets: tuple[float, ...] = _opt(DEFAULT_BUCKETS_MS, _env_floats)
    native_histograms: bool = _opt(True, _env_bool)
    native_schema: int = _opt(3, _env_int)
    native_max_buckets: int = _opt(160, _env_int)
    max_series: int = _opt(500, _env_int)
    count_builtin_endpoints: bool = _opt(False, _env_bool)
    multiproc_dir: str | None = _opt(None)
    service_version: str = _opt("")
    access_log: bool = _opt(True, _env_bool)
    route_normaliser: Callable[[str], str] | None = _opt(None, None)
    sinks: tuple[Callable[..., Any], ...] = _opt((), None)
    checks: Mapping[str, Any] = field(default_factory=dict, metadata={"env": None})
    check_timeout: float = _opt(2.0, _env_float)
    check_ttl: float = _opt(5.0, _env_float)
    stats: Callable[[], Mapping[str, float]] | None = _opt(None, None)
    stats_ttl: float = _opt(30.0, _env_float)
    metrics_token: str | None = field(default=None, repr=False, metadata={"env": _env_str})
    metrics_allow: tuple[str, ...] = _opt((), _env_list)
    trusted_proxies: tuple[str, ...] = _opt((), _env_list)
    log_dir: str | None = _opt(None)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] = os.environ
    ) -> Settings:
        """Merge *options* over ``SFMON_*`` variables over defaults, then validate."""
        known = {f.name: f for f in fields(cls)}
        for name in options:
            if name not in known:
                raise TypeError(f"unknown sfmon option {name!r}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            env_name = "SFMON_" + name.upper()
            if name in options:
                values[name] = options[name]
            elif f.metadata.get("env") is not None and env_name in environ:
                values[name] = f.metadata["env"](env_name, environ[env_name])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad option."""
        import re

        for name in ("namespace", "prefix", "request_id_header", "service_version"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"option {name} must be a str")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", self.namespace):
            raise ValueError(
                f"option namespace must be a metric name prefix, not {self.namespace!r}"
            )
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or " " in self.prefix:
            raise ValueError(f"option prefix must look like '/api/metrics', not {self.prefix!r}")
        if not re.fullmatch(r"[A-Za-z0-9-]+", self.request_id_header):
            raise ValueError(
                f"option request_id_header is not a header name: {self.request_id_header!r}"
            )
        for name in ("native_histograms", "count_builtin_endpoints", "access_log"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option {name} must be a bool")
        for name, low, high in (
            ("native_schema", -4, 8),
            ("native_max_buckets", 1, 10**6),
            ("max_series", 1, 10**7),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"option {name} must be an int")
            if not low <= value <= high:
                raise ValueError(f"option {name} must be in {low}..{high}, not {value}")
        buckets: object = self.buckets
        if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
            raise TypeError("option buckets must be a sequence of numbers")
        from .metrics import validate_buckets

        object.__setattr__(self, "buckets", validate_buckets("option buckets", self.buckets))
        for name in ("check_timeout", "check_ttl", "stats_ttl"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"option {name} must be a number")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"option {name} must be > 0, not {value}")
        if self.multiproc_dir is not None and not isinstance(
            self.multiproc_dir, (str, os.PathLike)
        ):
            raise TypeError("option multiproc_dir must be a path")
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise TypeError("option log_dir must be a path")
        if self.route_normaliser is not None and not callable(self.route_normaliser):
            raise TypeError("option route_normaliser must be callable")
        if self.stats is not None and not callable(self.stats):
            raise TypeError("option stats must be callable")
        sinks = self.sinks
        if not isinstance(sinks, (list, tuple)) or not all(callable(s) for s in sinks):
            raise TypeError("option sinks must be a sequence of callables")
        object.__setattr__(self, "sinks", tuple(sinks))
        if not isinstance(self.checks, Mapping) or not all(
            isinstance(k, str) and callable(v) for k, v in self.checks.items()
        ):
            raise TypeError("option checks must map names to callables")
        if self.metrics_token is not None and (
            not isinstance(self.metrics_token, str) or len(self.metrics_token) < 8
        ):
            raise ValueError("option metrics_token must be a str of at least 8 characters")
        for name in ("metrics_allow", "trusted_proxies"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(x, str) for x in value):
                raise TypeError(f"option {name} must be a sequence of addresses/networks")
            import ipaddress

            for item in value:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(
                        f"option {name}: {item!r} is not an address or network"
                    ) from None
            object.__setattr__(self, name, tuple(value))

    def config_hash(self) -> str:
        """A short stable hash of the plain-valued options (for config-change alerts)."""
        plain = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.metadata.get("env") is not None and f.name != "metrics_token"
        }
        blob = json.dumps(plain, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
