"""Protection for the data endpoints: a bearer token and/or a source allow-list.

Off unless configured (``metrics_token``, ``metrics_allow``). ``X-Forwarded-For`` is
honoured only when the direct peer is one of ``trusted_proxies``; the client is then
the right-most forwarded address that is not itself a trusted proxy.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .config import Settings

__all__ = ["client_address", "guard"]

Handler = Callable[["WSGIEnvironment", "StartResponse"], Iterable[bytes]]
Network = Any  # ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(items: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(i, strict=False) for i in items]


def _in(addr: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_address(environ: WSGIEnvironment, trusted: list[Network]) -> str:
    """The client's address: ``REMOTE_ADDR``, or the forwarded one via trusted proxies."""
    peer = str(environ.get("REMOTE_ADDR", ""))
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not forwarded or not trusted or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in str(forwarded).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _refuse(
    start_response: StartResponse,
    status: str,
    extra: list[tuple[str, str]],
    environ: WSGIEnvironment,
) -> list[bytes]:
    body = b'{"error": "' + status.split(" ", 1)[1].lower().encode() + b'"}'
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra]
    )
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def guard(settings: Settings, handler: Handler) -> Handler:
    """Return *handler* behind the configured token / allow-list (or as is, if none)."""
    token = settings.metrics_token
    allow = _networks(settings.metrics_allow)
    trusted = _networks(settings.trusted_proxies)
    if token is None and not allow:
        return handler
    expected = f"Bearer {token}".encode() if token is not None else b""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if allow and not _in(client_address(environ, trusted), allow):
            return _refuse(start_response, "403 Forbidden", [], environ)
        if token is not None:
            given = str(environ.get("HTTP_AUTHORIZATION", "")).encode("utf-8", "replace")
            # Constant-time comparison: the time taken says nothing about the token.
            if not hmac.compare_digest(given, expected):
                return _refuse(
                    start_response,
                    "401 Unauthorized",
                    [("WWW-Authenticate", 'Bearer realm="sfmon"')],
                    environ,
                )
        return handler(environ, start_response)

    return guarded
