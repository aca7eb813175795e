"""Slow and stalled clients at the HTTP edge, over real sockets against a live gateway.

A request head that never completes, a body that stalls, a client that hangs up mid-body and a
crowd of stalled connections: each is closed by the server (408 where a response is possible),
recorded plainly in the access log and ``/metrics``, and never keeps an honest client out.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Gateway, GatewayFactory

# Only a bound so that a broken server fails the test instead of hanging it; nothing is
# asserted about how long anything took.
SOCKET_BOUND_S = 60


@pytest.fixture(scope="module")
def edge_gateway(gateways: GatewayFactory) -> Gateway:
    return gateways.start(
        FALGATE_HEADER_TIMEOUT_S="1", FALGATE_BODY_TIMEOUT_S="1", FALGATE_KEEP_ALIVE_TIMEOUT_S="1"
    )


def _connect(gateway: Gateway) -> socket.socket:
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_BOUND_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open; got so far: {data!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def _access_lines(gateway: Gateway) -> Iterator[dict[str, object]]:
    for line in gateway.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "falgate.access":
                yield record


def _eventually(check: object, what: str) -> None:
    deadline = time.monotonic() + 20
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_stalled_request_head_gets_408_and_is_closed(edge_gateway: Gateway) -> None:
    with _connect(edge_gateway) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: gateway\r\nContent-Ty")
        status, headers, body = _split(_read_until_closed(sock))
    assert status == 408
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout"
    assert "headers" in error["message"]
    assert error["request_id"] == headers["x-request-id"]
    assert (
        edge_gateway.metric(r'falgate_edge_closed_connections_total\{reason="header_timeout"') >= 1
    )


def test_a_connection_that_sends_nothing_is_closed(edge_gateway: Gateway) -> None:
    with _connect(edge_gateway) as sock:
        assert _read_until_closed(sock) == b""


def test_a_trickled_request_head_is_cut_off(edge_gateway: Gateway) -> None:
    """The head's deadline counts from its first byte: one byte at a time does not extend it."""
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + b"X-Pad: " + b"a" * 400
    with _connect(edge_gateway) as sock:
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed while we were still trickling
                closed = True
                break
            time.sleep(0.02)
        if not closed:  # every byte went out before the deadline hit: the close must follow
            assert _split(_read_until_closed(sock))[0] == 408


def test_a_stalled_body_gets_408_on_its_route(edge_gateway: Gateway, api_key: str) -> None:
    del api_key  # the edge answers before authentication matters
    with _connect(edge_gateway) as sock:
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            b'{"prompt": "a st'
        )
        status, headers, body = _split(_read_until_closed(sock))
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert (
        edge_gateway.metric(
            r'falgate_http_requests_total\{.*route="/v1/generate".*status="408"',
        )
        >= 1
    )
    _eventually(
        lambda: any(
            r["status"] == 408 and r["route"] == "/v1/generate" for r in _access_lines(edge_gateway)
        ),
        "no access line with 408 on /v1/generate",
    )


def test_a_client_gone_mid_body_is_a_499_on_its_route(edge_gateway: Gateway) -> None:
    before = edge_gateway.metric(
        r'falgate_http_requests_total\{.*route="/v1/run/\{model_id\}".*status="499"'
    )
    with _connect(edge_gateway) as sock:
        sock.sendall(
            b"POST /v1/run/fal-ai/flux/dev HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            b'{"prompt": "gone'
        )
        time.sleep(0.2)  # let the server start reading the body (not an assertion)
    _eventually(
        lambda: (
            edge_gateway.metric(
                r'falgate_http_requests_total\{.*route="/v1/run/\{model_id\}".*status="499"',
            )
            > before
        ),
        "the abandoned request was not counted as 499 on its route",
    )
    assert edge_gateway.metric(r'route="<unmatched>".*status="500"') == 0
    lines = [r for r in _access_lines(edge_gateway) if r["path"] == "/v1/run/fal-ai/flux/dev"]
    assert any(r["status"] == 499 for r in lines)
    assert not any(r["status"] == 500 for r in _access_lines(edge_gateway))


def test_stalled_connections_do_not_keep_a_normal_request_out(
    gateways: GatewayFactory,
) -> None:
    """300 stalled heads against a cap of 100 connections and a long head deadline: the oldest
    stalled connections make room, and an honest request is answered."""
    gateway = gateways.start(FALGATE_MAX_CONNECTIONS="100", FALGATE_HEADER_TIMEOUT_S="120")
    _, key = gateway.create_key(name="honest")
    stalled: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = _connect(gateway)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthor")
            stalled.append(sock)
        with gateway.client(key) as client:
            response = client.post("/v1/generate/price", json={"prompt": "still served"})
        assert response.status_code == 200, response.text
        # The first stalled connections were closed by the server to make room.
        assert _read_until_closed(stalled[0]) == b""
        assert gateway.metric(r'falgate_edge_closed_connections_total\{reason="evicted"') >= 200
    finally:
        for sock in stalled:
            sock.close()
