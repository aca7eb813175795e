"""The log handler's batching: lines reach stdout together, and never later than the interval.

Read from the file on disk (what a log shipper sees), not from the stream's buffer.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from app.ops.logging import BatchedStreamHandler


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
