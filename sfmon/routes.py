"""Route labels: the bounded values of the ``method`` and ``path`` labels.

The middleware prefers a route template that the app or a framework adapter left in
``environ["sfmon.route"]``; without one, :func:`normalise_path` turns the raw URL path into
a template-like value, so ids in URLs never become label values.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

__all__ = [
    "MAX_ROUTE_LENGTH",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_LENGTH",
    "OTHER_METHOD",
    "OVERFLOW",
    "STANDARD_METHODS",
    "UNMATCHED",
    "method_label",
    "normalise_path",
    "route_label",
]

#: The methods of RFC 9110 plus PATCH; any other method is labelled :data:`OTHER_METHOD`.
STANDARD_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: The ``method`` label of a request whose method is not in :data:`STANDARD_METHODS`.
OTHER_METHOD = "_OTHER"
#: The one ``path`` label shared by every request that matched no route (404/405).
UNMATCHED = "<unmatched>"
#: The label value that replaces new label values once a metric's series cap is reached.
OVERFLOW = "__overflow__"
#: Longest ``path`` label: longer route templates are cut, longer paths are shortened.
MAX_ROUTE_LENGTH = 200
#: Paths with more segments keep the first ``MAX_SEGMENTS`` and end in ``/...``.
MAX_SEGMENTS = 10
#: A path segment longer than this is an id or a blob, whatever it holds: ``<token>``.
MAX_SEGMENT_LENGTH = 64

_TRUNCATED = "..."
# Paths shorter than this go through the cache; longer ones (rare, and possibly hostile)
# are worked out each time so the cache never pins large strings in memory.
_CACHED_PATH_LENGTH = 512

_SLASHES = re.compile(r"//+")
# C0 control characters would end up raw in the text exposition, and a lone surrogate
# cannot be encoded as UTF-8 at all: both become U+FFFD. C1 controls are left alone:
# PATH_INFO is latin-1-decoded bytes, so they are parts of UTF-8 sequences ("€").
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
).fullmatch
_HEX = re.compile(r"[0-9a-fA-F]{16,}").fullmatch
# base64, base64url, JWTs (dot-separated) and "prefix_secret" API keys; '=' only as padding.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.~+-]+(={0,2})").fullmatch
_DIGIT = re.compile(r"[0-9]").search
_LETTER = re.compile(r"[A-Za-z]").search
# Readable text is words (letters, maybe with a number before or after: "v2", "2fa", "x86")
# joined by separators: "how-to-cook-pasta-2023". Random tokens interleave letters and
# digits, so they fail this even when they happen to contain separators.
_WORD = r"(?:[0-9]*[A-Za-z]+[0-9]*|[0-9]+)"
_WORDY = re.compile(rf"{_WORD}(?:[-_.~+]{_WORD})*").fullmatch
# A short file extension after an id: "123.json" -> "<int>.json".
_EXTENSION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,7}").fullmatch


def method_label(method: str) -> str:
    """Return the ``method`` label for an HTTP method: itself if standard, else ``_OTHER``.

    Methods are case-sensitive (RFC 9110), so ``"get"`` is not ``GET``: it is ``_OTHER``,
    like any invented method, which keeps the label set to ten values.

    :param method: the request method, as in ``environ["REQUEST_METHOD"]``.

    .. code-block:: python

        method_label("PATCH")    # 'PATCH'
        method_label("PROPFIND") # '_OTHER'
    """
    return method if method in STANDARD_METHODS else OTHER_METHOD


def _is_token(segment: str) -> bool:
    # Called only for 16..MAX_SEGMENT_LENGTH characters that are not hex.
    m = _TOKEN_CHARS(segment)
    if m is None:
        return False
    if m.group(1):
        # '='-padded base64 always has a length that is a multiple of four.
        return len(segment) % 4 == 0
    return _DIGIT(segment) is not None and _LETTER(segment) is not None and not _WORDY(segment)


def _normalise_stem(stem: str) -> str:
    if stem.isdigit() and stem.isascii():
        return "<int>"
    n = len(stem)
    if n > MAX_SEGMENT_LENGTH:
        return "<token>"
    if n < 16:
        return stem
    if _UUID(stem):
        return "<uuid>"
    if _HEX(stem):
        return "<hex>"
    if _is_token(stem):
        return "<token>"
    return stem


def _normalise_segment(segment: str) -> str:
    if "." in segment and len(segment) <= MAX_SEGMENT_LENGTH:
        stem, _, extension = segment.rpartition(".")
        if stem and _EXTENSION(extension):
            new_stem = _normalise_stem(stem)
            if new_stem != stem:
                return new_stem + "." + extension
    return _normalise_stem(segment)


def _normalise(path: str) -> str:
    if not path.isprintable():
        path = _UNPRINTABLE.sub("\ufffd", path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    lead = ""
    if path.startswith("/"):
        lead, path = "/", path[1:]
    if not path:
        return "/"
    trailing = path.endswith("/")
    if trailing:
        path = path[:-1]
    # maxsplit bounds the work on a path with thousands of segments.
    segments = path.split("/", MAX_SEGMENTS)
    truncated = len(segments) > MAX_SEGMENTS
    if truncated:
        del segments[MAX_SEGMENTS:]
    segments = [_normalise_segment(s) for s in segments]
    result = lead + "/".join(segments)
    if truncated or len(result) > MAX_ROUTE_LENGTH:
        # Drop whole segments, never cut one: a cut segment could read differently
        # ("12345abc" -> "12345"), and then normalising the result would change it again.
        limit = MAX_ROUTE_LENGTH - len(_TRUNCATED) - 1
        while len(result) > limit and len(segments) > 1:
            segments.pop()
            result = lead + "/".join(segments)
        return result + "/" + _TRUNCATED
    return result + "/" if trailing else result


_normalise_cached = functools.lru_cache(maxsize=4096)(_normalise)


def normalise_path(path: str) -> str:
    """Return a template-like label for a URL path that matched no known route template.

    Each segment (text between slashes) is replaced by a placeholder when it looks like
    an id, otherwise kept:

    - ``<int>``: ASCII digits only, however many (``123``);
    - ``<uuid>``: a UUID, with or without dashes, any case;
    - ``<hex>``: 16 or more hex digits (object ids, hashes);
    - ``<token>``: base64/base64url/JWT/API-key-looking text of 16 or more characters
      that mixes letters and digits and does not read as words (``how-to-v2-guide`` is
      kept), ``=``-padded base64, and any other segment longer than
      ``MAX_SEGMENT_LENGTH``.

    A short file extension survives (``123.json`` -> ``<int>.json``). Repeated slashes
    collapse, a trailing slash stays, an empty path is ``/``. Only the first
    ``MAX_SEGMENTS`` segments are kept and the result is at most ``MAX_ROUTE_LENGTH``
    characters; a shortened path ends in ``/...``. Control characters and lone
    surrogates become U+FFFD. It never raises on a ``str``, and normalising a result
    again returns it unchanged. Results for paths up to 512 characters are cached.

    :param path: the URL path, as in ``environ["PATH_INFO"]``.

    .. code-block:: python

        normalise_path("/api/users/42/orders/550e8400-e29b-41d4-a716-446655440000")
        # '/api/users/<int>/orders/<uuid>'
        normalise_path("/files/123.json")  # '/files/<int>.json'
    """
    if len(path) <= _CACHED_PATH_LENGTH:
        return _normalise_cached(path)
    return _normalise(path)


def route_label(
    environ_route: object,
    path: str,
    status: int,
    *,
    normaliser: Callable[[str], str] = normalise_path,
) -> str:
    """Return the ``path`` label of a finished request.

    In order: the route template in *environ_route* when it is a non-empty ``str``
    (cut to ``MAX_ROUTE_LENGTH`` characters); :data:`UNMATCHED` for a 404 or 405 without
    a template, so scanners probing random URLs add one series, not thousands; otherwise
    ``normaliser(path)``. A normaliser that raises, or returns anything but a non-empty
    ``str``, is replaced by :func:`normalise_path` for that request (monitoring never
    fails a request); a long result is cut to ``MAX_ROUTE_LENGTH`` characters.

    :param environ_route: the value of ``environ.get("sfmon.route")``, whatever it is.
    :param path: the URL path, as in ``environ["PATH_INFO"]``.
    :param status: the response status code.
    :param normaliser: turns a path into a label when no template is known.

    .. code-block:: python

        route_label("/items/<int:id>", "/items/7", 200)  # '/items/<int:id>'
        route_label(None, "/wp-login.php", 404)          # '<unmatched>'
        route_label(None, "/items/7", 200)               # '/items/<int>'
    """
    if isinstance(environ_route, str) and environ_route:
        return environ_route[:MAX_ROUTE_LENGTH]
    if status == 404 or status == 405:
        return UNMATCHED
    if normaliser is not normalise_path:
        try:
            label = normaliser(path)
        except Exception:
            label = None
        if isinstance(label, str) and label:
            return label[:MAX_ROUTE_LENGTH]
    return normalise_path(path)
