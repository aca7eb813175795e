"""Pure-ASGI plumbing shared by every route."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body


class BodyLimitMiddleware:
    """Answer 413 for a body over ``max_bytes`` before any of it is parsed, and 408 for a body
    that stalls.

    The body is read here (FastAPI would buffer it anyway) so an over-long chunked body is
    refused as cleanly as one with an honest Content-Length. A pause of more than
    ``idle_timeout_s`` between two pieces of the body, or a body not complete within
    ``deadline_s`` of its request head, ends the request with 408 and ``Connection: close``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        idle_timeout_s: float | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        while True:
            wait = self.idle_timeout_s
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0.0)
                wait = left if wait is None else min(wait, left)
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for runs the awaitable as
                # a task of its own, one more task per request.
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                await self._error(
                    scope, send, 408, "request_timeout", "The request body stopped arriving."
                )
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        message = f"Request body is larger than {self.max_bytes} bytes."
        await self._error(scope, send, 413, "payload_too_large", message)

    async def _error(
        self, scope: Scope, send: Send, status: int, error_type: str, message: str
    ) -> None:
        state = scope.get("state") or {}
        request_id = str(state.get("request_id", ""))
        payload = error_body(error_type, message, param=None, request_id=request_id)
        data = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
        ]
        if request_id:
            headers.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
