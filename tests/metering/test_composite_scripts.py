"""``run_together`` on a single Redis: several scripts as ONE command (issue 15).

Against a real ``redis-server``: each part sees only its own ``KEYS``/``ARGV``, a part's
error (returned or raised) is that part's reply and does not stop the next one, a Redis that
lost its script cache gets the composite loaded again, and Redis itself counts one command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from app.metering.lua import LuaScript, composite_of, run_together


@pytest.fixture
def scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r: Any) -> dict[str, LuaScript]:
    """Scripts of a throwaway package on ``sys.path`` (``LuaScript`` reads by package)."""
    package = tmp_path / "composite_scripts_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "echo.lua").write_text(
        "-- KEYS: any; ARGV: any. Writes ARGV[1] to KEYS[1], replies with what it saw.\n"
        "redis.call('SET', KEYS[1], ARGV[1])\n"
        "return {#KEYS, #ARGV, KEYS[1], ARGV[#ARGV]}\n"
    )
    (package / "refuse.lua").write_text("return redis.error_reply('refused ' .. ARGV[1])\n")
    (package / "crash.lua").write_text("local x = nil\nreturn x + KEYS[1]\n")
    (package / "nothing.lua").write_text("redis.call('SET', KEYS[1], 'ran')\nreturn nil\n")
    (package / "prelude.lua").write_text("local function twice(v) return v .. v end\n")
    (package / "uses_prelude.lua").write_text("return twice(ARGV[1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = package.name
    return {
        "echo": LuaScript(r, name, "echo.lua"),
        "refuse": LuaScript(r, name, "refuse.lua"),
        "crash": LuaScript(r, name, "crash.lua"),
        "nothing": LuaScript(r, name, "nothing.lua"),
        "prelude": LuaScript(r, name, "uses_prelude.lua", prelude=("prelude.lua",)),
    }


async def test_each_part_sees_only_its_own_keys_and_arguments(
    r: Any, scripts: dict[str, LuaScript]
) -> None:
    echo = scripts["echo"]
    replies = await run_together(
        r,
        echo.call(["a", "b", "c"], ["1", "2"]),
        echo.call(["d"], ["3", "4", "5", "6"]),
        scripts["prelude"].call([], ["ab"]),
    )
    assert replies == [[3, 2, "a", "2"], [1, 4, "d", "6"], "abab"]
    assert await r.mget("a", "d") == ["1", "3"]


async def test_an_error_is_the_reply_of_its_part_only(
    r: Any, scripts: dict[str, LuaScript]
) -> None:
    replies = await run_together(
        r,
        scripts["refuse"].call([], ["first"]),
        scripts["crash"].call(["k"], []),
        scripts["nothing"].call(["after"], []),
        scripts["echo"].call(["last"], ["ok"]),
    )
    assert isinstance(replies[0], redis.exceptions.ResponseError)
    assert str(replies[0]) == "refused first"
    assert isinstance(replies[1], redis.exceptions.ResponseError)
    assert "arithmetic" in str(replies[1])
    assert replies[2] is None  # a part that returned nothing
    assert replies[3] == [1, 1, "last", "ok"]
    assert await r.mget("after", "last") == ["ran", "ok"]  # both ran after the errors


async def test_one_command_for_redis_and_reloaded_after_a_script_flush(
    r: Any, scripts: dict[str, LuaScript]
) -> None:
    calls = (scripts["echo"].call(["x"], ["1"]), scripts["echo"].call(["y"], ["2"]))
    await run_together(r, *calls)  # loaded
    before = await r.info("commandstats")
    await run_together(r, *calls)
    after = await r.info("commandstats")
    evalsha = after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"]
    assert evalsha == 1
    assert await r.script_exists(composite_of(calls).sha) == [True]

    await r.script_flush()  # as after a restart or a failover
    assert await run_together(r, *calls) == [[1, 1, "x", "1"], [1, 1, "y", "2"]]
    assert await r.script_exists(composite_of(calls).sha) == [True]
