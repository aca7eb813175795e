"""``python -m app.sandbox``: the fal emulator alone (the same as ``falgate sandbox``)."""

from __future__ import annotations

import argparse

from app.sandbox.server import run_sandbox


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--latency-ms", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    run_sandbox(
        args.host,
        args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        latency_ms=args.latency_ms,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
