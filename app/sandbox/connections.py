"""Dropping a client's connection without a response, which plain ASGI cannot express.

The sandbox's servers use :class:`SandboxHTTPProtocol`, which remembers each connection's
transport by its (client, server) address pair, the same pair an ASGI scope carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_TRANSPORTS: dict[tuple[Any, Any], asyncio.BaseTransport] = {}


class SandboxHTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a registry of open transports for the ``drop`` fault."""

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
