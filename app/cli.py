"""The ``falgate`` command: ``serve``, ``sandbox``, ``keys ...``, ``usage ...``, ``ledger ...``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.errors import FalgateError
from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from app.ops.tls import TlsFiles


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import StartupError, create_app, resolve_admin_token
    from app.ops.edge import edge_options
    from app.ops.logging import configure_logging, uvicorn_options
    from app.ops.metrics import metrics_of
    from app.ops.tls import TlsConfigError, tls_files
    from app.redis import private_dir

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = get_settings().model_copy(update=overrides)
    private_dir(settings.data_dir)
    try:
        resolve_admin_token(settings)
    except StartupError as exc:
        print(f"falgate: {exc}", file=sys.stderr)
        return 2
    try:
        tls = tls_files(settings)
    except TlsConfigError as exc:
        print(f"falgate: {exc}", file=sys.stderr)
        return 2
    options = uvicorn_options(settings)
    if tls is not None:
        options.update(ssl_certfile=str(tls.certfile), ssl_keyfile=str(tls.keyfile))
        _print_tls(settings, tls)
    configure_logging(settings)
    workers = args.workers if args.workers is not None else settings.workers
    if workers < 1:
        print("falgate: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1:
        from app.ops.workers import serve_workers

        return serve_workers(settings, workers, resolve_admin_token(settings), options)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        **options,
        **edge_options(settings, metrics_of(app)),
    )
    return 0


def _print_tls(settings: Settings, tls: TlsFiles) -> None:
    """Where the gateway is served over https, and (development CA) the one line that makes
    fal's clients trust it."""
    host = (
        "localhost"
        if settings.host in ("127.0.0.1", "0.0.0.0", "::", "localhost")
        else settings.host
    )
    address = f"{host}:{settings.port}"
    lines = [f"falgate: serving https://{address}"]
    if tls.ca_file is not None:
        ca = tls.ca_file.resolve()
        lines += [
            f"falgate: development CA (sandbox TLS): {ca}",
            "falgate: fal's clients, in one copy-paste:",
            f"  SSL_CERT_FILE={ca} FAL_RUN_HOST={address}/fal/run "
            f"FAL_QUEUE_RUN_HOST={address}/fal/queue FAL_KEY=<falgate key>",
            f"  NODE_EXTRA_CA_CERTS={ca}  # for @fal-ai/client (proxyUrl: https://{address}/fal/proxy)",
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _sandbox(args: argparse.Namespace) -> int:
    from app.sandbox import run_sandbox

    run_sandbox(
        args.host,
        args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        latency_ms=args.latency_ms,
        access_log=not args.no_access_log,
    )
    return 0


class NoGateway(Exception):
    """The CLI cannot find the Redis of a running gateway; the message says where it looked."""


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Any]:
    """The gateway's Redis: ``FALGATE_REDIS_URL``, or the embedded server of the gateway that
    runs on this data dir. Never a new, empty one: that would answer ``[]`` about nothing."""
    from app.redis import redis_client

    url = settings.redis_url
    if url is None:
        data_dir = settings.data_dir.resolve()
        url_file = data_dir / "redis.url"
        if not url_file.exists():
            raise NoGateway(
                f"no running gateway found: {url_file} does not exist. Run this where "
                "'falgate serve' runs (or set FALGATE_DATA_DIR to its data dir) while it is "
                "running, or set FALGATE_REDIS_URL."
            )
        url = url_file.read_text().strip()
        probe = redis_client(url, settings)
        try:
            await probe.ping()
        except Exception as exc:
            raise NoGateway(
                f"the gateway's Redis named in {url_file} does not answer "
                f"({type(exc).__name__}): is 'falgate serve' still running?"
            ) from exc
        finally:
            await probe.aclose()
    client = redis_client(url, settings)
    try:
        yield client
    finally:
        await client.aclose()


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _key_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(args, "name", None) is not None:
        fields["name"] = args.name
    if args.budget is not None:
        fields["budget_usd"] = None if args.budget.lower() == "none" else Decimal(args.budget)
    if args.period is not None:
        fields["budget_period"] = args.period
    if args.rpm is not None:
        fields["rpm"] = None if args.rpm == 0 else args.rpm
    if args.max_concurrent is not None:
        fields["max_concurrent"] = None if args.max_concurrent == 0 else args.max_concurrent
    if args.models is not None:
        fields["models"] = None if args.models == "" else args.models.split(",")
    if args.expires_at is not None:
        fields["expires_at"] = (
            None if args.expires_at == "" else datetime.fromisoformat(args.expires_at)
        )
    return fields


async def _keys(args: argparse.Namespace) -> int:
    from app.catalog import load_catalog
    from app.keys.schemas import KeyCreate, KeyUpdate
    from app.keys.service import KeyService, model_names

    settings = get_settings()
    catalog = load_catalog(settings.catalog_file)
    async with _redis(settings) as redis:
        keys = KeyService(redis, known_models=model_names(catalog))
        if args.keys_command == "create":
            key, plaintext = await keys.create(KeyCreate(**_key_fields(args)))
            _print({**key.to_out().model_dump(mode="json"), "key": plaintext})
        elif args.keys_command == "list":
            _print([k.to_out().model_dump(mode="json") for k in await keys.list()])
        elif args.keys_command == "show":
            _print((await keys.get(args.id)).to_out().model_dump(mode="json"))
        elif args.keys_command == "update":
            key = await keys.update(args.id, KeyUpdate(**_key_fields(args)))
            _print(key.to_out().model_dump(mode="json"))
        elif args.keys_command == "revoke":
            _print((await keys.revoke(args.id)).to_out().model_dump(mode="json"))
    return 0


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", help="budget in USD ('none' = unlimited)")
    parser.add_argument("--period", choices=["total", "daily", "monthly"])
    parser.add_argument("--rpm", type=int, help="requests per minute (0 = gateway default)")
    parser.add_argument("--max-concurrent", type=int, help="in-flight requests (0 = default)")
    parser.add_argument("--models", help="comma-separated model ids ('' = all)")
    parser.add_argument("--expires-at", help="ISO 8601 time ('' = never)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (settings from FALGATE_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="server processes (default FALGATE_WORKERS, 1)")
    serve.set_defaults(func=_serve)

    sandbox = sub.add_parser("sandbox", help="run the fal emulator alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8100)
    sandbox.add_argument("--ssl-certfile")
    sandbox.add_argument("--ssl-keyfile")
    sandbox.add_argument("--latency-ms", type=int, default=None)
    sandbox.add_argument(
        "--no-access-log", action="store_true", help="no log line per request (benchmarks)"
    )
    sandbox.set_defaults(func=_sandbox)

    keys = sub.add_parser("keys", help="manage gateway keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (prints it once)")
    create.add_argument("--name", required=True)
    _add_limit_options(create)
    keys_sub.add_parser("list", help="list keys")
    show = keys_sub.add_parser("show", help="show one key")
    show.add_argument("id")
    update = keys_sub.add_parser("update", help="change a key's limits")
    update.add_argument("id")
    update.add_argument("--name")
    _add_limit_options(update)
    revoke = keys_sub.add_parser("revoke", help="revoke a key (its ledger stays)")
    revoke.add_argument("id")
    keys.set_defaults(func=lambda a: asyncio.run(_keys(a)))

    _add_usage_parser(sub)
    _add_ledger_parser(sub)
    return parser


def _add_usage_parser(sub: Any) -> None:
    usage = sub.add_parser("usage", help="spend by key, model or day, or one key's budget")
    usage.add_argument("--key-id", help="only this key (alone: its budget, spend and limits)")
    usage.add_argument("--from", dest="start", help="inclusive start date/datetime (UTC)")
    usage.add_argument("--to", dest="end", help="exclusive end datetime, or a date (included)")
    usage.add_argument("--group-by", choices=["key", "model", "day"], help="report grouping")
    usage.add_argument(
        "report",
        nargs="?",
        choices=["ledger"],
        help="'ledger': export the ledger entries (with --format) instead of a report",
    )
    usage.add_argument(
        "--format", dest="ledger_format", choices=["jsonl", "csv"], help="ledger format (jsonl)"
    )
    usage.add_argument("--ledger", choices=["jsonl", "csv"], help=argparse.SUPPRESS)  # old
    usage.add_argument("--after", help="with 'ledger': resume after this entry's cursor")
    usage.add_argument("--limit", type=int, help="with 'ledger': at most this many entries")
    usage.set_defaults(func=lambda a: asyncio.run(_usage(a)))


@contextlib.asynccontextmanager
async def _ledger(settings: Settings) -> AsyncIterator[Any]:
    """The ledger service on the gateway's Redis and archive database (migrated)."""
    from app.ledger.service import LedgerService

    async with _redis(settings) as redis:
        ledger = LedgerService.from_settings(redis, settings)
        try:
            await ledger.migrate()
            yield ledger
        finally:
            ledger.close()


async def _usage(args: argparse.Namespace) -> int:
    from app.ledger.export import ExportQuery, decode_cursor
    from app.metering import Meter
    from app.metering.reports import parse_moment

    settings = get_settings()
    start, end = parse_moment(args.start), parse_moment(args.end, end=True)
    ledger_format = args.ledger or (
        args.ledger_format or "jsonl" if args.report == "ledger" else None
    )
    if args.ledger_format and args.report != "ledger":
        raise ValueError("--format applies to 'falgate usage ledger'")
    async with _ledger(settings) as ledger:
        if ledger_format:
            query = ExportQuery(
                key_id=args.key_id,
                start_ms=int(start.timestamp() * 1000) if start else None,
                end_ms=int(end.timestamp() * 1000) if end else None,
                after=decode_cursor(args.after) if args.after else None,
                limit=args.limit,
            )
            out = sys.stdout.buffer
            async for chunk in await ledger.export(query, ledger_format):
                out.write(chunk)
            out.flush()
        elif args.key_id and not (args.group_by or start or end):
            _print(await Meter(ledger.redis, settings, "cli").usage(args.key_id))
        else:
            _print(
                await ledger.usage(
                    key_id=args.key_id, start=start, end=end, group_by=args.group_by or "key"
                )
            )
    return 0


async def _ledger_command(args: argparse.Namespace) -> int:
    import secrets

    settings = get_settings()
    async with _ledger(settings) as ledger:
        if args.ledger_command == "migrate":
            _print({"schema_version": await asyncio.to_thread(ledger.database.schema_version)})
        elif args.ledger_command == "drain":
            drainer = ledger.drainer(f"cli_{secrets.token_hex(4)}")
            report = await drainer.drain(wait_s=args.wait)
            _print({"archived": report.archived, "trimmed": report.trimmed, "keys": report.keys})
        elif args.ledger_command == "backfill":
            _print({"keys_backfilled": await ledger.backfill_rollups()})
    return 0


def _add_ledger_parser(sub: Any) -> None:
    ledger = sub.add_parser("ledger", help="the SQL ledger archive")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    ledger_sub.add_parser("migrate", help="create or upgrade the archive's tables")
    drain = ledger_sub.add_parser(
        "drain", help="archive every ledger entry now, then trim Redis to the retention window"
    )
    drain.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for a running drainer"
    )
    ledger_sub.add_parser(
        "backfill", help="count ledger entries older than the rollups into them (once per key)"
    )
    ledger.set_defaults(func=lambda a: asyncio.run(_ledger_command(a)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
        return result
    except BrokenPipeError:
        # The reader went away (``falgate usage ledger | head``): stop quietly, as cat does.
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the pipe
    except NoGateway as exc:
        print(f"falgate: {exc}", file=sys.stderr)
        return 1
    except FalgateError as exc:
        print(f"falgate: {exc.message}", file=sys.stderr)
        return 1
    except (ValidationError, ValueError) as exc:
        print(f"falgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
