"""Clients generated from the live ``/openapi.json`` work against a live gateway.

Two generators that take the document at its word: ``openapi-python-client`` (Python, attrs
models) and ``@hey-api/openapi-ts`` (TypeScript, compiled with ``tsc`` from the committed
lockfile). Each generated client prices, generates, reads its usage, creates a key, exports the
ledger (CSV and JSON lines: text, not JSON), reads a request's outcome by its id and gets a 402
and a 429 as typed errors with their fields.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Gateway

TS_DIR = Path(__file__).resolve().parent / "ts"
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, **kwargs: Any) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-10_000:]}"
    return output


# --- Python: openapi-python-client -------------------------------------------------------


@pytest.fixture(scope="module")
def py_client(contract_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    out = tmp_path_factory.mktemp("pyclient")
    package = out / "falgate_client"
    output = _run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--url",
            f"{contract_gateway.url}/openapi.json",
            "--output-path",
            str(package),
            "--meta",
            "none",
        ],
        cwd=out,
    )
    # The generator warns about every part of the document it could not turn into code.
    assert "Warning" not in output, output
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("falgate_client")
    finally:
        sys.path.remove(str(out))


def _py(module: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{module.__name__}.{name}")


def test_python_client(py_client: ModuleType, contract_gateway: Gateway) -> None:
    client_mod = _py(py_client, "client")
    models = _py(py_client, "models")
    api = "api."
    price_generate = _py(py_client, api + "generation.price_generate")
    generate = _py(py_client, api + "generation.generate")
    get_usage = _py(py_client, api + "usage.get_usage")
    get_request = _py(py_client, api + "usage.get_request")
    create_key = _py(py_client, api + "admin.create_key")
    export_ledger = _py(py_client, api + "admin.export_ledger")
    usage_report = _py(py_client, api + "admin.get_usage_report")
    url = contract_gateway.url
    admin = client_mod.AuthenticatedClient(base_url=url, token=ADMIN_TOKEN)

    # A key's creation, by the admin client.
    created = create_key.sync(
        client=admin, body=models.KeyCreate(name="py-client", budget_usd="1", rpm=1)
    )
    assert isinstance(created, models.KeyCreated), created
    assert created.key.startswith("fgk_") and created.budget_usd == "1.000000"
    client = client_mod.AuthenticatedClient(base_url=url, token=created.key, timeout=60)

    body = models.GenerateRequest(
        prompt="a red fox", image_size=models.GenerateRequestImageSizeType0.SQUARE
    )
    price = price_generate.sync(client=client, body=body)
    assert isinstance(price, models.PriceResponse), price
    assert price.amount_usd == "0.003933" and price.megapixels == 0.262144

    done = generate.sync_detailed(client=client, body=body)
    assert done.status_code == 200 and isinstance(done.parsed, models.GenerateResponse)
    assert done.parsed.cost.amount_usd == "0.003933" and done.parsed.images[0].width == 512
    assert done.headers["X-Cost-USD"] == "0.003933"
    record = get_request.sync(client=client, request_id=done.headers["X-Request-Id"])
    assert isinstance(record, models.RequestStatus), record
    assert record.status == models.RequestStatusStatus.COMPLETED
    assert isinstance(record.cost, models.RequestCost) and record.cost.amount_usd == "0.003933"

    # 429: rpm 1 and one request made this minute; a typed error with its fields and headers.
    limited = generate.sync_detailed(client=client, body=body)
    assert limited.status_code == 429 and isinstance(limited.parsed, models.ErrorEnvelope)
    assert limited.parsed.error.type_ == models.ErrorDetailType.RATE_LIMITED
    assert limited.parsed.error.limit_type == models.ErrorDetailLimitType.RPM
    assert int(limited.headers["Retry-After"]) >= 1

    usage = get_usage.sync(client=client)
    assert isinstance(usage, models.KeyUsage), usage
    assert usage.spent_usd == "0.003933" and usage.remaining_usd == "0.996067"

    # 402: a key whose budget is smaller than the estimate.
    poor = create_key.sync(client=admin, body=models.KeyCreate(name="py-poor", budget_usd="0.001"))
    assert isinstance(poor, models.KeyCreated), poor
    poor_client = client_mod.AuthenticatedClient(base_url=url, token=poor.key)
    refused = generate.sync_detailed(client=poor_client, body=body)
    assert refused.status_code == 402 and isinstance(refused.parsed, models.ErrorEnvelope)
    error = refused.parsed.error
    assert error.type_ == models.ErrorDetailType.BUDGET_EXCEEDED
    assert (error.estimate_usd, error.remaining_usd) == ("0.003933", "0.001000")

    # The ledger, as CSV and as JSON lines: text, parsed by the caller.
    since = datetime.now(UTC) - timedelta(hours=1)
    csv_text = export_ledger.sync(
        client=admin, key_id=created.id, from_=since, format_=models.ExportLedgerFormat.CSV
    )
    assert isinstance(csv_text, str) and csv_text.splitlines()[0].startswith(
        "timestamp,event,key_id"
    )
    lines = export_ledger.sync(client=admin, key_id=created.id)
    assert isinstance(lines, str)
    events = [json.loads(line)["event"] for line in lines.splitlines()]
    assert events == ["hold", "settle"], events

    report = usage_report.sync(
        client=admin, key_id=created.id, group_by=models.GetUsageReportGroupBy.MODEL
    )
    assert isinstance(report, models.UsageReport), report
    assert [(r.model, r.requests, r.amount_usd) for r in report.rows] == [
        ("fal-ai/flux/dev", 1, "0.003933")
    ]


# --- TypeScript: @hey-api/openapi-ts, compiled with tsc ------------------------------------


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("npm is required in CI for the TypeScript client test")
        pytest.skip("npm is not installed (CI installs it; this test never skips there)")
    return npm


@pytest.fixture(scope="module")
def ts_project(contract_gateway: Gateway) -> Iterator[Path]:
    npm = _npm()
    _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=TS_DIR)
    spec = httpx.get(f"{contract_gateway.url}/openapi.json", timeout=10).text
    (TS_DIR / "openapi.json").write_text(spec)
    for leftover in ("generated", "dist"):
        shutil.rmtree(TS_DIR / leftover, ignore_errors=True)
    _run([npm, "run", "--silent", "generate"], cwd=TS_DIR)
    _run([npm, "run", "--silent", "build"], cwd=TS_DIR)
    yield TS_DIR


def test_typescript_client(ts_project: Path, contract_gateway: Gateway) -> None:
    node = shutil.which("node")
    assert node is not None
    _, key = contract_gateway.create_key(name="ts-client")
    output = _run(
        [node, "dist/smoke.js"],
        cwd=ts_project,
        env={"FALGATE_URL": contract_gateway.url, "FALGATE_KEY": key, "ADMIN_TOKEN": ADMIN_TOKEN},
    )
    results = json.loads(output.strip().splitlines()[-1])
    assert results == {
        "price": "0.003933",
        "generated": {"cost": "0.003933", "width": 512, "header": "0.003933"},
        "request": {"status": "completed", "cost": "0.003933"},
        "spent": "0.003933",
        "created": {"prefix": "fgk_", "budget": "1.000000"},
        "rateLimited": {"status": 429, "type": "rate_limited", "limitType": "rpm"},
        "budgetExceeded": {
            "status": 402,
            "type": "budget_exceeded",
            "estimate": "0.003933",
            "remaining": "0.001000",
        },
        "ledger": {"csvHeader": True, "events": ["hold", "settle"]},
    }, results
