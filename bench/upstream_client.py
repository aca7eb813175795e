"""What one upstream call costs the gateway's process, by client layer (issue 15).

One process sends POSTs, one at a time, to nginx replaying a recorded sandbox answer (the
fixed-reply stub of ``bench/stack.py``: no upstream CPU worth counting) and reads its own CPU
time per call for three ways of making the same call:

- ``httpx-client``: ``httpx.AsyncClient`` (the fal client's ``CookielessAsyncClient``) on
  ``AiohttpTransport``, a URL given as a string: what the gateway did before the model URLs
  were parsed once;
- ``httpx-client-url``: the same with a parsed ``httpx.URL`` (what ``FalClient`` does for run
  and submit URLs);
- ``direct-client``: ``DirectClient`` (what ``FalClient`` uses since issue 15's sixth pass):
  an ``httpx.Request`` with the client's default headers and timeouts, built per call and sent
  straight through ``AiohttpTransport``;
- ``transport``: ``AiohttpTransport.handle_async_request`` with a prepared ``httpx.Request``
  (the client's own layers left out);
- ``aiohttp``: aiohttp's ``ClientSession`` alone (the floor).

Rounds are interleaved and each ratio is taken within its round; the median is printed.

    .venv/bin/python bench/upstream_client.py            # 5 rounds x 3000 calls
    .venv/bin/python bench/upstream_client.py --rounds 2 --calls 300

Needs nginx (``apt-get install nginx-light``). Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from app.upstream.transport import (  # noqa: E402
    AiohttpTransport,
    CookielessAsyncClient,
    DirectClient,
)
from bench import stack  # noqa: E402

BODY = json.dumps({"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}}).encode()
Call = Callable[[], Awaitable[bytes]]


async def measure(url: str, rounds: int, calls: int) -> dict[str, list[float]]:
    """CPU µs per call of each way, per round."""
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=10, keepalive_expiry=2.0)
    transport = AiohttpTransport(limits=limits)
    headers = {"Authorization": "Key bench", "User-Agent": "falgate"}
    client = CookielessAsyncClient(
        transport=transport, headers=headers, timeout=httpx.Timeout(5.0), limits=limits
    )
    session = aiohttp.ClientSession()
    json_type = {"Content-Type": "application/json"}
    parsed = httpx.URL(url)
    prepared_headers = httpx.Headers({**headers, **json_type})
    timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}

    async def httpx_client() -> bytes:
        return (await client.request("POST", url, content=BODY, headers=json_type)).content

    async def httpx_client_url() -> bytes:
        return (await client.request("POST", parsed, content=BODY, headers=json_type)).content

    direct = DirectClient(transport, headers=headers, timeout=httpx.Timeout(5.0))

    async def direct_client() -> bytes:
        return (await direct.request("POST", parsed, content=BODY, headers=json_type)).content

    async def bare_transport() -> bytes:
        request = httpx.Request(
            "POST", parsed, content=BODY, headers=prepared_headers, extensions={"timeout": timeouts}
        )
        response = await transport.handle_async_request(request)
        return await response.aread()

    async def aiohttp_alone() -> bytes:
        async with session.post(url, data=BODY, headers={**headers, **json_type}) as response:
            return await response.read()

    ways: dict[str, Call] = {
        "httpx-client": httpx_client,
        "httpx-client-url": httpx_client_url,
        "direct-client": direct_client,
        "transport": bare_transport,
        "aiohttp": aiohttp_alone,
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(rounds):
            for name, way in ways.items():
                for _ in range(max(calls // 10, 10)):  # warm the pool
                    await way()
                started = time.process_time()
                for _ in range(calls):
                    await way()
                results[name].append((time.process_time() - started) / calls * 1e6)
    finally:
        await session.close()
        await client.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    if stack.nginx_binary() is None:
        sys.exit("nginx is not installed (apt-get install nginx-light)")
    workdir = stack.make_workdir(None)
    sandbox = stack.start_sandbox(workdir)
    stub = None
    try:
        stub = stack.start_stub(workdir, sandbox.url, BODY)
        assert stub is not None
        results = asyncio.run(measure(f"{stub.url}/fal-ai/flux/dev", args.rounds, args.calls))
    finally:
        if stub is not None:
            stub.stop()
        sandbox.stop()
        stack.remove_workdir(workdir)
    floor = results["aiohttp"]
    print("| way | CPU µs per call (median) | over aiohttp alone (median of rounds) |")
    print("|---|---:|---:|")
    for name, values in results.items():
        over = statistics.median(v - f for v, f in zip(values, floor, strict=True))
        print(f"| {name} | {statistics.median(values):.0f} | {over:+.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
