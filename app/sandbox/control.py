"""A small async client for a running sandbox's control API (``/_sandbox/...``)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx


class SandboxControl:
    """Configure faults and latency, reset, and read the request ledger of a sandbox.

    ``base_url`` is the sandbox root (what :func:`embedded_sandbox` yields).
    """

    def __init__(self, base_url: str, *, verify: Any = True) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=10, verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def configure(self, **changes: Any) -> dict[str, Any]:
        """``PUT /_sandbox/config``: change the given fields (``faults`` replaces the list)."""
        return await self._call("PUT", "/_sandbox/config", json=changes)

    async def config(self) -> dict[str, Any]:
        return await self._call("GET", "/_sandbox/config")

    async def add_fault(self, **rule: Any) -> dict[str, Any]:
        """``POST /_sandbox/faults``: append one :class:`FaultRule`."""
        return await self._call("POST", "/_sandbox/faults", json=rule)

    async def clear_faults(self) -> dict[str, Any]:
        return await self._call("DELETE", "/_sandbox/faults")

    async def reset(self) -> dict[str, Any]:
        """``POST /_sandbox/reset``: initial config, no faults, empty ledger and files."""
        return await self._call("POST", "/_sandbox/reset")

    async def requests(self, **filters: str) -> list[dict[str, Any]]:
        """The ledger, oldest first; filters: ``status``, ``endpoint``."""
        body = await self._call("GET", "/_sandbox/requests", params=filters)
        return list(body["requests"])

    async def request(self, request_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/_sandbox/requests/{request_id}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._http.request(method, path, **kwargs)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body
