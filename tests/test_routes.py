"""Route labels: method labels, the path normaliser and the route-label decision."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfmon import routes
from sfmon.routes import (
    MAX_ROUTE_LENGTH,
    OTHER_METHOD,
    STANDARD_METHODS,
    UNMATCHED,
    method_label,
    normalise_path,
    route_label,
)

UUID = "550e8400-e29b-41d4-a716-446655440000"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
    ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        *(pytest.param(m, m, id=m) for m in sorted(STANDARD_METHODS)),
        pytest.param("get", OTHER_METHOD, id="lower-case"),
        pytest.param("Get", OTHER_METHOD, id="mixed-case"),
        pytest.param("PROPFIND", OTHER_METHOD, id="webdav"),
        pytest.param("", OTHER_METHOD, id="empty"),
        pytest.param("GET ", OTHER_METHOD, id="trailing-space"),
        pytest.param("X" * 10_000, OTHER_METHOD, id="huge"),
    ],
)
def test_method_label(method: str, expected: str) -> None:
    assert method_label(method) == expected


def test_standard_methods_are_the_nine() -> None:
    expected = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

    assert frozenset(expected) == STANDARD_METHODS
    assert OTHER_METHOD == "_OTHER"


def test_constants() -> None:
    assert routes.UNMATCHED == "<unmatched>"
    assert routes.OVERFLOW == "__overflow__"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # kept
        pytest.param("/", "/", id="root"),
        pytest.param("", "/", id="empty"),
        pytest.param("/api/health", "/api/health", id="static"),
        pytest.param("/api/v2/users", "/api/v2/users", id="version"),
        pytest.param("/api/users/", "/api/users/", id="trailing-slash-kept"),
        pytest.param("relative/7", "relative/<int>", id="no-leading-slash"),
        pytest.param("/users/alice", "/users/alice", id="short-word"),
        pytest.param("/blog/how-to-cook-pasta-2023", "/blog/how-to-cook-pasta-2023", id="slug"),
        pytest.param("/x86_64-linux-gnu", "/x86_64-linux-gnu", id="wordy-digits"),
        pytest.param("/getUserAccountSettingsV2", "/getUserAccountSettingsV2", id="camel"),
        pytest.param("/report-2023.pdf", "/report-2023.pdf", id="file"),
        pytest.param("/v1.2", "/v1.2", id="dotted-version"),
        pytest.param("/1.5", "/1.5", id="decimal"),
        pytest.param("/deadbeef", "/deadbeef", id="short-hex"),
        pytest.param("/caf\xc3\xa9", "/caf\xc3\xa9", id="latin1-decoded-utf8"),
        # numbers
        pytest.param("/api/items/123", "/api/items/<int>", id="int"),
        pytest.param("/api/items/0/", "/api/items/<int>/", id="int-trailing-slash"),
        pytest.param("/a/1/b/2", "/a/<int>/b/<int>", id="two-ints"),
        pytest.param("/n/" + "9" * 300, "/n/<int>", id="huge-int"),
        pytest.param("/files/123.json", "/files/<int>.json", id="int-extension"),
        pytest.param("/n/\u0661\u0662", "/n/\u0661\u0662", id="non-ascii-digits-kept"),
        pytest.param("/n/-5", "/n/-5", id="signed-kept"),
        # uuids
        pytest.param(f"/u/{UUID}", "/u/<uuid>", id="uuid"),
        pytest.param(f"/u/{UUID.upper()}", "/u/<uuid>", id="uuid-upper"),
        pytest.param(f"/u/{UUID.replace('-', '')}", "/u/<uuid>", id="uuid-no-dashes"),
        pytest.param(f"/u/{UUID}.xml", "/u/<uuid>.xml", id="uuid-extension"),
        # hex
        pytest.param("/o/507f1f77bcf86cd799439011", "/o/<hex>", id="objectid"),
        pytest.param("/c/" + "a" * 40, "/c/<hex>", id="sha1-letters-only"),
        pytest.param("/c/DA39A3EE5E6B4B0D3255BFEF95601890AFD80709", "/c/<hex>", id="sha1-upper"),
        pytest.param("/c/0123456789abcdef.png", "/c/<hex>.png", id="hex-extension"),
        # tokens
        pytest.param("/t/dGhpcyBpcyBhIHRva2Vu_x9Yz", "/t/<token>", id="base64url"),
        pytest.param("/t/SGVsbG8gV29ybGQhIQ==", "/t/<token>", id="base64-padded"),
        pytest.param("/pay/cus_NffrFeUfNV2Hib", "/pay/<token>", id="api-key"),
        pytest.param(f"/reset/{JWT}", "/reset/<token>", id="jwt"),
        pytest.param("/k/k3j4h5g6f7d8s9a0q1w2", "/k/<token>", id="lower-alnum"),
        pytest.param("/l/" + "word-" * 20, "/l/<token>", id="over-64-chars"),
        pytest.param("/t/aB3dE-fG7hI_jK9lM-nO1p", "/t/<token>", id="base64url-separators"),
        # mixed
        pytest.param(
            f"/api/users/42/orders/{UUID}/items/7.json",
            "/api/users/<int>/orders/<uuid>/items/<int>.json",
            id="mixed",
        ),
        pytest.param("//api///items//9", "/api/items/<int>", id="repeated-slashes"),
        pytest.param("/a" * 30, "/a/a/a/a/a/a/a/a/a/a/...", id="many-segments"),
        pytest.param("/a" * 10, "/a" * 10, id="ten-segments-kept"),
        pytest.param("/" * 10_000, "/", id="only-slashes"),
        # weird characters
        pytest.param("/a\x00b/\ud800", "/a\ufffdb/\ufffd", id="nul-and-surrogate"),
        pytest.param("/a\nb\r\t", "/a\ufffdb\ufffd\ufffd", id="control"),
        pytest.param("/items/<int>/x", "/items/<int>/x", id="placeholder-kept"),
    ],
)
def test_normalise_path(path: str, expected: str) -> None:
    assert normalise_path(path) == expected


def test_normalise_path_long_path_is_cut_at_a_segment_boundary() -> None:
    segment = "abcdefghij" * 6  # 60 chars: too readable to be a token, kept as is
    path = "/" + "/".join([segment] * 8)

    result = normalise_path(path)

    assert len(result) <= MAX_ROUTE_LENGTH
    assert result == "/" + "/".join([segment] * 3) + "/..."


def test_normalise_path_huge_input_is_bounded() -> None:
    path = "/api/" + "x" * 5_000_000 + "/7"

    result = normalise_path(path)

    assert result == "/api/<token>/<int>"


def test_normalise_path_huge_input_is_not_cached() -> None:
    """A cached 5 MB key would stay in memory until evicted."""
    routes._normalise_cached.cache_clear()

    normalise_path("/x/" + "1" * 10_000)

    assert routes._normalise_cached.cache_info().currsize == 0


def test_normalise_path_hundred_ids_give_one_value() -> None:
    paths = [f"/api/items/{i * 7919}" for i in range(100)]
    paths += [f"/api/items/{uuid.uuid4()}" for _ in range(100)]
    paths += [f"/api/items/{uuid.uuid4().hex}" for _ in range(100)]

    values = {normalise_path(p) for p in paths}

    assert values == {"/api/items/<int>", "/api/items/<uuid>"}


_paths = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.one_of(
            st.text(alphabet="0123456789abcdefABCDEF-", max_size=40),
            st.text(alphabet="abcXYZ019_-.=+~", max_size=80),
            st.sampled_from(["", ".", "..", "123.json", UUID, "<int>", "api", JWT]),
            st.text(max_size=20),
        ),
        max_size=25,
    ).map("/".join),
)


@settings(max_examples=1500, deadline=None)
@given(_paths)
def test_normalise_path_never_raises_and_is_bounded_and_idempotent(path: str) -> None:
    result = normalise_path(path)

    assert isinstance(result, str)
    assert 1 <= len(result) <= MAX_ROUTE_LENGTH
    assert result.count("/") <= routes.MAX_SEGMENTS + 1
    result.encode("utf-8")  # no lone surrogates reach the exposition
    assert normalise_path(result) == result


def _boom(path: str) -> str:
    raise RuntimeError("bad normaliser")


@pytest.mark.parametrize(
    ("environ_route", "path", "status", "kwargs", "expected"),
    [
        pytest.param("/items/<int:id>", "/items/7", 200, {}, "/items/<int:id>", id="template"),
        pytest.param("/items/<int:id>", "/items/7", 404, {}, "/items/<int:id>", id="tpl-404"),
        pytest.param("/x/" + "y" * 500, "/x", 200, {}, ("/x/" + "y" * 500)[:200], id="long"),
        pytest.param(None, "/items/7", 200, {}, "/items/<int>", id="no-template"),
        pytest.param("", "/items/7", 200, {}, "/items/<int>", id="empty-template"),
        pytest.param(b"/items", "/items/7", 200, {}, "/items/<int>", id="bytes-template"),
        pytest.param(42, "/items/7", 200, {}, "/items/<int>", id="int-template"),
        pytest.param(None, "/wp-login.php", 404, {}, UNMATCHED, id="404"),
        pytest.param(None, "/items/7", 405, {}, UNMATCHED, id="405"),
        pytest.param(None, "/items/7", 500, {}, "/items/<int>", id="500-normalised"),
        pytest.param(None, "/items/7", 401, {}, "/items/<int>", id="401-normalised"),
        pytest.param(None, "/a/7", 200, {"normaliser": str.upper}, "/A/7", id="custom-normaliser"),
        pytest.param(
            None, "/a/7", 200, {"normaliser": _boom}, "/a/<int>", id="raising-normaliser"
        ),
        pytest.param(
            None, "/a/7", 200, {"normaliser": lambda p: ""}, "/a/<int>", id="empty-normaliser"
        ),
        pytest.param(
            None, "/a/7", 200, {"normaliser": lambda p: None}, "/a/<int>", id="none-normaliser"
        ),
        pytest.param(
            None, "/a", 200, {"normaliser": lambda p: "z" * 999}, "z" * 200, id="long-normaliser"
        ),
        pytest.param(None, "/a/7", 404, {"normaliser": _boom}, UNMATCHED, id="404-no-normaliser"),
    ],
)
def test_route_label(
    environ_route: object, path: str, status: int, kwargs: dict[str, object], expected: str
) -> None:
    assert route_label(environ_route, path, status, **kwargs) == expected  # type: ignore[arg-type]


def test_route_label_str_subclass_gives_plain_str() -> None:
    class Route(str):
        pass

    result = route_label(Route("/items/<id>"), "/items/1", 200)

    assert type(result) is str
    assert result == "/items/<id>"
