"""Dropping a client's connection without a response, which plain ASGI cannot express.

The sandbox's servers use :class:`SandboxHTTPProtocol`, which remembers each connection's
transport by its (client, server) address pair, the same pair an ASGI scope carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TRANSPORTS: dict[tuple[Any, Any], asyncio.BaseTransport] = {}


class SandboxHTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a registry of open transports for the ``drop`` fault.

    httptools (a C parser) rather than h11: the sandbox stands in for a remote service, so on a
    machine it shares with a gateway its CPU should stay small next to the gateway's."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _TRANSPORTS[(self.client, self.server)] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        _TRANSPORTS.pop((self.client, self.server), None)
        super().connection_lost(exc)


def close_connection(scope: MutableMapping[str, Any]) -> bool:
    """Close the connection behind ``scope`` at once; False if it is not one of ours."""
    transport = _TRANSPORTS.get((scope.get("client"), scope.get("server")))
    if transport is None:
        return False
    transport.close()
    return True
