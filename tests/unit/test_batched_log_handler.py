"""The log handler's batching: lines reach stdout together, and never later than the interval.

Read from the file on disk (what a log shipper sees), not from the stream's buffer, or from a
stream that counts its writes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

from app.ops.logging import BatchedStreamHandler, JsonFormatter, _current_request_id


def _record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("falgate.access", level, __file__, 1, message, None, None)


def test_lines_of_one_moment_are_written_together_and_soon(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        handler = BatchedStreamHandler(stream, interval_s=0.05)

        async def serve() -> list[str]:
            seen = []
            for i in range(20):
                handler.emit(_record(f"line {i}"))
            seen.append(path.read_text())  # nothing written yet: one write is coming
            await asyncio.sleep(0.2)
            seen.append(path.read_text())
            handler.emit(_record("late"))
            await asyncio.sleep(0.2)
            seen.append(path.read_text())
            return seen

        before, after, later = asyncio.run(serve())
    assert before == ""
    assert after.splitlines() == [f"line {i}" for i in range(20)]
    assert later.splitlines()[-1] == "late"


def test_warnings_and_lines_outside_an_event_loop_are_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        handler = BatchedStreamHandler(stream, interval_s=60)
        handler.emit(_record("no loop here"))
        assert path.read_text() == "no loop here\n"

        async def serve() -> str:
            handler.emit(_record("queued"))
            handler.emit(_record("trouble", logging.WARNING))
            return path.read_text()

        assert asyncio.run(serve()).splitlines() == ["no loop here", "queued", "trouble"]


def test_a_flush_lost_with_its_event_loop_does_not_hold_lines_back(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        handler = BatchedStreamHandler(stream, interval_s=0.01)

        async def log_then_stop() -> None:
            handler.emit(_record("in a loop that ends"))  # its flush never runs

        asyncio.run(log_then_stop())
        handler._flush_due = 0.0  # as if that flush were long overdue
        handler.emit(_record("after"))
        assert path.read_text().splitlines() == ["in a loop that ends", "after"]


def test_the_secret_precheck_never_lets_a_secret_through() -> None:
    """``scrub`` skips the three secret patterns when a cheap scan finds nothing they could
    match: over many lines built from the patterns' own pieces, the result is exactly that of
    applying every pattern."""
    import random

    from app.ops.logging import _SECRET_PATTERNS, JsonFormatter

    rng = random.Random(15)
    pieces = [
        "Bearer ", "bearer\t", "Key ", "key  ", "KEY ", "xKey ", "fgk_", "stx_key_k1_",
        "0123456789abcdef" * 2, "abcdefghijklmnopqrstuvwxyz", "token=", '"key_id":"key_1"',
        " ", ":", "\u00a0", "ey", "earer", "{", "}",
    ]  # fmt: skip
    formatter = JsonFormatter()
    for _ in range(3000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        expected = line
        for pattern, replacement in _SECRET_PATTERNS:
            expected = pattern.sub(replacement, expected)
        assert formatter.scrub(line) == expected, line


class _CountingStream(io.StringIO):
    """stdout as ``PYTHONUNBUFFERED`` makes it: every ``write`` is a system call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _access(status: int, args: tuple[object, ...] | None = None) -> logging.LogRecord:
    record = logging.LogRecord(
        "falgate.access", logging.INFO, __file__, 1, "POST /v1/run %s", args or (status,), None
    )
    record.status = status
    return record


def test_access_lines_wait_for_one_write_and_keep_their_request_id() -> None:
    stream = _CountingStream()
    handler = BatchedStreamHandler(stream, interval_s=0.05, batched=["falgate.access"])
    handler.setFormatter(JsonFormatter())

    async def serve() -> tuple[int, int]:
        for i in range(20):
            token = _current_request_id.set(f"req_{i}")
            try:
                handler.emit(_access(200 + i))
            finally:
                _current_request_id.reset(token)
        before = stream.writes
        await asyncio.sleep(0.2)
        return before, stream.writes

    before, after = asyncio.run(serve())
    assert (before, after) == (0, 1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["request_id"], line["status"]) for line in lines] == [
        (f"req_{i}", 200 + i) for i in range(20)
    ]
    assert lines[3]["msg"] == "POST /v1/run 203"


def test_a_waiting_line_logged_outside_a_request_does_not_take_the_next_ones_id() -> None:
    stream = _CountingStream()
    handler = BatchedStreamHandler(stream, interval_s=60, batched=["falgate.access"])
    handler.setFormatter(JsonFormatter())

    async def serve() -> list[dict[str, object]]:
        handler.emit(_access(200))  # logged outside any request: waits
        token = _current_request_id.set("req_later")
        try:  # a line of another request, written at once: the waiting one goes first
            handler.emit(logging.LogRecord("falgate", logging.INFO, __file__, 1, "x", None, None))
        finally:
            _current_request_id.reset(token)
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    first, second = asyncio.run(serve())
    assert "request_id" not in first
    assert second["request_id"] == "req_later"


def test_other_lines_are_written_at_once_after_the_waiting_ones() -> None:
    stream = _CountingStream()
    handler = BatchedStreamHandler(stream, interval_s=60, batched=["falgate.access"])

    async def serve() -> list[str]:
        handler.emit(_access(200))
        handler.emit(_access(201))
        done = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Done.", None, None)
        handler.emit(done)  # not a batched logger: written now, after the two before it
        return stream.getvalue().splitlines()

    assert asyncio.run(serve()) == [
        "POST /v1/run 200",
        "POST /v1/run 201",
        "Done.",
    ]


def test_a_record_that_could_change_is_formatted_at_once() -> None:
    """Arguments other than plain values (a dict a caller may still change) and tracebacks
    are formatted when logged, not later."""
    stream = _CountingStream()
    handler = BatchedStreamHandler(stream, interval_s=60, batched=["falgate.access"])
    changing = {"a": 1}

    async def serve() -> str:
        handler.emit(_access(200, args=(changing,)))
        changing["a"] = 2
        return stream.getvalue()

    assert asyncio.run(serve()) == "POST /v1/run {'a': 1}\n"
