"""``FlatRoute`` answers every request exactly as FastAPI's own handler does.

One app, the project's error handlers, and the metered routes' shape (a path string, the
``Idempotency-Key`` header with its constraints, a request-only key dependency, the real
``GenerateRequest`` body) declared twice: once on ``FlatRoute``, once on FastAPI's
``APIRoute``. Every request below, good and hostile, must get the same status and the same
body from both.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from app.errors import Unauthorized, _leaf_routes, add_exception_handlers
from app.falapi.routes import router as fal_router
from app.fastjson import FastJSONResponse
from app.generation.routes import router as generation_router
from app.generation.schemas import GenerateRequest
from app.main import create_app
from app.metering.idempotency import KEY_PATTERN, MAX_KEY_LENGTH
from app.routing import FlatRoute, is_json_media, plan_of

CALLS: list[str] = []


async def caller(request: Request) -> str:
    CALLS.append("key")
    token = request.headers.get("authorization")
    if token != "Bearer good":
        raise Unauthorized("No key.")
    return "key_1"


Key = Annotated[str, Depends(caller)]
Body_ = Annotated[GenerateRequest, Body()]
IdemKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LENGTH, pattern=KEY_PATTERN),
]


async def endpoint(
    request: Request, model_id: str, body: Body_, key: Key, idem: IdemKey = None
) -> Response:
    return FastJSONResponse(
        {
            "model_id": model_id,
            "key": key,
            "idem": idem,
            "body": body.model_dump(mode="json"),
            "path": request.url.path,
        }
    )


async def audited(request: Request) -> None:
    """A dependency added where the router is included, not on the route."""
    CALLS.append("audit")
    if request.headers.get("x-audit") == "refuse":
        raise Unauthorized("Refused by the inclusion's dependency.")


def _app() -> FastAPI:
    app = FastAPI()
    add_exception_handlers(app)
    flat = APIRouter(prefix="/flat", route_class=FlatRoute)
    plain = APIRouter(prefix="/plain", route_class=APIRoute)
    for router in (flat, plain):
        router.add_api_route("/run/{model_id:path}", endpoint, methods=["POST"])
        app.include_router(router, dependencies=[Depends(audited)])
    return app


APP = _app()
GOOD = json.dumps({"prompt": "a red fox"}).encode()
AUTH = {"Authorization": "Bearer good"}
JSON = {"Content-Type": "application/json", **AUTH}

CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("good", GOOD, JSON),
    ("good with idempotency key", GOOD, {**JSON, "Idempotency-Key": "k-1"}),
    ("empty idempotency key", GOOD, {**JSON, "Idempotency-Key": ""}),
    ("long idempotency key", GOOD, {**JSON, "Idempotency-Key": "k" * (MAX_KEY_LENGTH + 1)}),
    ("bad key and bad body", b'{"prompt": 3}', {**JSON, "Idempotency-Key": ""}),
    ("not JSON", b'{"prompt": ', JSON),
    ("NaN", b'{"prompt": "x", "guidance_scale": NaN}', JSON),
    ("past 64 bits", b'{"prompt": "x", "seed": 100000000000000000000000}', JSON),
    ("1e400", b'{"prompt": "x", "guidance_scale": 1e400}', JSON),
    ("utf-16", '{"prompt": "a fox"}'.encode("utf-16"), JSON),
    ("utf-8 bom", b'\xef\xbb\xbf{"prompt": "a fox"}', JSON),
    ("not utf-8", b'{"prompt": "\xff\xfe"}', JSON),
    ("lone surrogate", b'{"prompt": "\\ud800"}', JSON),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, JSON),
    ("null", b"null", JSON),
    ("a list", b"[]", JSON),
    ("a string", b'"a fox"', JSON),
    ("empty body", b"", JSON),
    ("unknown field", b'{"prompt": "x", "colour": "red"}', JSON),
    ("wrong type deep", b'{"prompt": "x", "image_size": {"width": "a", "height": 1}}', JSON),
    ("text/plain", GOOD, {"Content-Type": "text/plain", **AUTH}),
    ("no content type", GOOD, AUTH),
    ("blank content type", GOOD, {"Content-Type": " ", **AUTH}),
    ("json with charset", GOOD, {"Content-Type": "Application/JSON; charset=utf-8", **AUTH}),
    ("+json", GOOD, {"Content-Type": "application/merge-patch+json", **AUTH}),
    ("two slashes", GOOD, {"Content-Type": "application/json/x", **AUTH}),
    ("no key", GOOD, {"Content-Type": "application/json"}),
    ("no key, bad JSON", b"{", {"Content-Type": "application/json"}),
    ("no key, bad body", b'{"prompt": 3}', {"Content-Type": "application/json"}),
    ("refused where included", GOOD, {**JSON, "X-Audit": "refuse"}),
]


async def _answer(prefix: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, int]:
    CALLS.clear()
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(f"{prefix}/run/fal-ai/flux/dev", content=body, headers=headers)
    try:
        payload: Any = response.json()
    except ValueError:
        payload = response.text
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        payload["error"].pop("request_id")  # a new one per request
    if isinstance(payload, dict) and "path" in payload:
        payload["path"] = payload["path"].replace(prefix, "", 1)
    return response.status_code, payload, len(CALLS)


@pytest.mark.parametrize(("name", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_flat_and_fastapi_answer_the_same(name: str, body: bytes, headers: dict[str, str]) -> None:
    flat = asyncio.run(_answer("/flat", body, headers))
    plain = asyncio.run(_answer("/plain", body, headers))
    assert flat == plain, name


def test_the_cases_reach_every_outcome() -> None:
    """The matrix is not all one kind of answer: successes, 400s and 401s all occur."""
    statuses = {asyncio.run(_answer("/plain", b, h))[0] for _, b, h in CASES}
    assert {200, 400, 401} <= statuses


def test_the_flat_route_follows_its_plan_where_included() -> None:
    """The comparison above is between two handlers, not FastAPI's twice: the inclusion's own
    dependency did not make the flat route fall back."""
    flat = [r for r in _leaf_routes(APP.router.routes) if isinstance(r, FlatRoute)]
    assert flat and all(r.planned for r in flat)


def test_every_metered_route_is_planned() -> None:
    """The gateway's metered routes keep their fast path in the app (a new parameter kind
    would drop it silently); routes with a response model to serialise keep FastAPI's."""
    create_app()  # includes the routers: each route's handler is built for the app
    routes = [r for r in _leaf_routes(generation_router.routes) if isinstance(r, FlatRoute)]
    metered = [r for r in routes if not r.path.endswith("/price")]
    assert len(metered) == 4 and all(r.planned for r in metered)
    assert all(not r.planned and plan_of(r) is None for r in routes if r not in metered)
    fal = {r.name: r for r in _leaf_routes(fal_router.routes) if isinstance(r, FlatRoute)}
    assert fal["fal_run"].planned and fal["fal_queue_submit"].planned


def test_dependency_overrides_are_honoured() -> None:
    async def stub() -> str:
        return "overridden"

    APP.dependency_overrides[caller] = stub
    try:
        status, payload, _ = asyncio.run(
            _answer("/flat", GOOD, {"Content-Type": "application/json"})
        )
    finally:
        APP.dependency_overrides.clear()
    assert (status, payload["key"]) == (200, "overridden")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", True),
        ("APPLICATION/JSON ; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("application/jsonx", False),
        ("text/json", False),
        ("application/json/x", False),
        ("", False),
    ],
)
def test_json_media_types(value: str, expected: bool) -> None:
    assert is_json_media(value) is expected
