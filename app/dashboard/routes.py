"""``/dashboard``: the operator and team pages (SPEC section 13).

Plain HTML forms and server-drawn SVG: every page works without JavaScript (the only script
is the copy button). Signed-out visitors are redirected to the sign-in page; a team session on
an operator page, and any change without the session's CSRF token, get a 403 envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from app.dashboard.charts import gauge, stacked_bars, swatch
from app.dashboard.schemas import (
    form_error,
    key_create_from_form,
    key_update_from_form,
    parse_form,
)
from app.dashboard.service import WINDOWS, DashboardService, ExportFormat, KeyView, StackBy
from app.dashboard.sessions import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_TTL_S,
    Session,
    SessionStore,
    admin_fingerprint,
    new_csrf_token,
    tokens_match,
)
from app.errors import FalgateError, Forbidden, InvalidRequest, NotFound, Unauthorized
from app.keys.service import KEY_PREFIX, KeyService
from app.money import format_usd
from app.ops.metrics import metrics_of

HERE = Path(__file__).resolve().parent
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["usd"] = lambda micro: "—" if micro is None else format_usd(int(micro))
templates.globals.update(gauge=gauge, stacked_bars=stacked_bars, swatch=swatch)

router = APIRouter(prefix="/dashboard", include_in_schema=False)


class SignInRequired(Exception):
    """No valid session: the visitor is sent to the sign-in page."""


# --- collaborators and sessions --------------------------------------------------
async def dashboard_service(request: Request) -> DashboardService:
    state = request.app.state
    return DashboardService(state.keys, state.meter, metrics_of(request.app))


async def session_store(request: Request) -> SessionStore:
    return SessionStore(request.app.state.redis)


ServiceDep = Annotated[DashboardService, Depends(dashboard_service)]
StoreDep = Annotated[SessionStore, Depends(session_store)]


async def current_session(request: Request, store: StoreDep) -> Session | None:
    """The visitor's session if it is still good: an operator's admin token unchanged, a team's
    key still active."""
    session = await store.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    if session.is_operator:
        expected = admin_fingerprint(request.app.state.admin_token)
        return session if tokens_match(session.admin_fp, expected) else None
    keys: KeyService = request.app.state.keys
    try:
        key = await keys.get(session.key_id)
    except NotFound:
        return None
    return session if key.effective_status() == "active" else None


MaybeSession = Annotated[Session | None, Depends(current_session)]


async def any_session(session: MaybeSession) -> Session:
    if session is None:
        raise SignInRequired
    return session


async def operator_session(session: Annotated[Session, Depends(any_session)]) -> Session:
    if not session.is_operator:
        raise Forbidden(
            "Operator pages need the admin token sign-in; a gateway key cannot open them."
        )
    return session


async def team_session(session: Annotated[Session, Depends(any_session)]) -> Session:
    if session.is_operator:
        raise Forbidden("The team view is for a gateway key sign-in.")
    return session


AnySession = Annotated[Session, Depends(any_session)]
Operator = Annotated[Session, Depends(operator_session)]
Team = Annotated[Session, Depends(team_session)]


async def changed_form(request: Request, session: Session) -> dict[str, str]:
    """The POSTed form, once its CSRF token proved it came from a dashboard page."""
    form = parse_form(await request.body())
    if not tokens_match(form.get("csrf_token"), session.csrf):
        raise Forbidden("Missing or invalid CSRF token: reload the page and try again.")
    return form


# --- rendering ----------------------------------------------------------------------
def page(
    request: Request,
    name: str,
    session: Session | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> Response:
    html = templates.get_template(name).render(
        session=session, path=request.url.path, now=datetime.now(UTC), **context
    )
    return Response(html, status_code, headers=SECURITY_HEADERS, media_type="text/html")


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _window(days: int) -> int:
    if days not in WINDOWS:
        raise InvalidRequest(f"days must be one of {', '.join(map(str, WINDOWS))}.", param="days")
    return days


async def _export(chunks: AsyncIterator[str], key_id: str, fmt: ExportFormat) -> StreamingResponse:
    """The ledger as a download; the first chunk is read before answering, so an unreachable
    Redis is a 503 rather than a cut-off file."""
    first = await anext(chunks, None)

    async def body() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    disposition = f'attachment; filename="ledger-{key_id}.{fmt}"'
    return StreamingResponse(
        body(),
        media_type=media,
        headers={"Content-Disposition": disposition, "Cache-Control": "no-store"},
    )


# --- sign-in ------------------------------------------------------------------------
@router.get("")
async def home(session: MaybeSession) -> RedirectResponse:
    if session is None:
        return redirect("/dashboard/login")
    return redirect("/dashboard/overview" if session.is_operator else "/dashboard/team")


def _login_page(request: Request, *, error: str | None = None, status_code: int = 200) -> Response:
    login_csrf = new_csrf_token()
    response = page(
        request, "login.html", None, error=error, csrf=login_csrf, status_code=status_code
    )
    response.set_cookie(
        LOGIN_COOKIE,
        login_csrf,
        max_age=3600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.get("/login")
async def login_form(request: Request, session: MaybeSession) -> Response:
    if session is not None:
        return redirect("/dashboard")
    return _login_page(request)


@router.post("/login")
async def login(request: Request, store: StoreDep) -> Response:
    form = parse_form(await request.body())
    if not tokens_match(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE, "")):
        raise Forbidden("Missing or invalid CSRF token: reload the sign-in page and try again.")
    token = form.get("token", "").strip()
    admin_token: str = request.app.state.admin_token
    session: Session
    if token.startswith(KEY_PREFIX):
        keys: KeyService = request.app.state.keys
        try:
            key = await keys.authenticate(token)
        except Unauthorized as exc:
            return _login_page(request, error=exc.message, status_code=401)
        session = Session(role="team", csrf=new_csrf_token(), key_id=key.id)
    elif tokens_match(token, admin_token):
        session = Session(
            role="operator", csrf=new_csrf_token(), admin_fp=admin_fingerprint(admin_token)
        )
    else:
        return _login_page(request, error="Invalid admin token or gateway key.", status_code=401)
    response = redirect("/dashboard")
    response.set_cookie(
        SESSION_COOKIE,
        await store.create(session),
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(
        LOGIN_COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="strict"
    )
    return response


@router.post("/logout")
async def logout(request: Request, session: AnySession, store: StoreDep) -> Response:
    await changed_form(request, session)
    await store.delete(request.cookies.get(SESSION_COOKIE))
    response = redirect("/dashboard/login")
    response.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="strict"
    )
    return response


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound("No such dashboard asset.")
    return FileResponse(
        HERE / "static" / name,
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


# --- operator pages -------------------------------------------------------------------
@router.get("/overview")
async def overview(
    request: Request,
    session: Operator,
    service: ServiceDep,
    days: int = 30,
    stack: StackBy = "key",
) -> Response:
    data = await service.overview(_window(days), stack)
    return page(
        request, "overview.html", session, data=data, days=days, stack=stack, windows=WINDOWS
    )


_SORTS: dict[str, Callable[[KeyView], Any]] = {
    "name": lambda v: v.key.name.lower(),
    "status": lambda v: v.key.effective_status(),
    "period": lambda v: v.period,
    "budget": lambda v: (v.budget is None, v.budget or 0),
    "spent": lambda v: v.spent,
    "remaining": lambda v: (v.remaining is None, v.remaining or 0),
    "rpm": lambda v: v.rpm,
    "max_concurrent": lambda v: v.max_concurrent,
    "expires": lambda v: (v.key.expires_at is None, v.key.expires_at or 0),
    "created": lambda v: v.key.created_at,
}


@router.get("/keys")
async def keys_table(
    request: Request,
    session: Operator,
    service: ServiceDep,
    sort: str = "created",
    order: str = "asc",
) -> Response:
    if sort not in _SORTS:
        raise InvalidRequest(f"sort must be one of {', '.join(_SORTS)}.", param="sort")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc.", param="order")
    views = sorted(await service.key_views(), key=_SORTS[sort], reverse=order == "desc")
    return page(
        request, "keys.html", session, views=views, sort=sort, order=order, columns=_COLUMNS
    )


_COLUMNS = (
    ("name", "Name"),
    ("status", "Status"),
    ("period", "Period"),
    ("budget", "Budget (USD)"),
    ("spent", "Spent (USD)"),
    ("remaining", "Remaining (USD)"),
    ("rpm", "RPM"),
    ("max_concurrent", "Max concurrent"),
    (None, "Models"),
    ("expires", "Expires"),
)


@router.get("/keys/new")
async def new_key_form(request: Request, session: Operator) -> Response:
    return page(request, "key_new.html", session, form={}, error=None)


@router.post("/keys")
async def create_key(request: Request, session: Operator, service: ServiceDep) -> Response:
    form = await changed_form(request, session)
    try:
        key, plaintext = await service.create_key(key_create_from_form(form))
    except ValidationError as exc:
        return page(
            request, "key_new.html", session, form=form, error=form_error(exc), status_code=400
        )
    except FalgateError as exc:
        if exc.status_code >= 500:
            raise
        return page(request, "key_new.html", session, form=form, error=exc.message, status_code=400)
    return page(request, "key_created.html", session, key=key, plaintext=plaintext, status_code=201)


async def _key_page(
    request: Request,
    session: Session,
    service: DashboardService,
    key_id: str,
    days: int,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    key = await service.keys.get(key_id)
    detail = await service.key_detail(key, _window(days))
    return page(
        request,
        "key.html",
        session,
        detail=detail,
        days=days,
        windows=WINDOWS,
        error=error,
        saved=request.query_params.get("saved") == "1",
        status_code=status_code,
    )


@router.get("/keys/{key_id}")
async def key_page(
    request: Request, key_id: str, session: Operator, service: ServiceDep, days: int = 30
) -> Response:
    return await _key_page(request, session, service, key_id, days)


@router.post("/keys/{key_id}")
async def update_key(
    request: Request, key_id: str, session: Operator, service: ServiceDep
) -> Response:
    form = await changed_form(request, session)
    try:
        await service.update_key(key_id, key_update_from_form(form))
    except ValidationError as exc:
        return await _key_page(
            request, session, service, key_id, 30, error=form_error(exc), status_code=400
        )
    except FalgateError as exc:
        if exc.status_code >= 500 or isinstance(exc, NotFound):
            raise
        return await _key_page(
            request, session, service, key_id, 30, error=exc.message, status_code=400
        )
    return redirect(f"/dashboard/keys/{key_id}?saved=1")


@router.get("/keys/{key_id}/revoke")
async def revoke_confirm(
    request: Request, key_id: str, session: Operator, service: ServiceDep
) -> Response:
    view = await service.key(key_id)
    return page(request, "revoke.html", session, view=view)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    request: Request, key_id: str, session: Operator, service: ServiceDep
) -> Response:
    await changed_form(request, session)
    await service.revoke_key(key_id)
    return redirect(f"/dashboard/keys/{key_id}")


@router.get("/keys/{key_id}/export")
async def export_key(
    key_id: str, session: Operator, service: ServiceDep, format: ExportFormat = "csv"
) -> StreamingResponse:
    key = await service.keys.get(key_id)
    return await _export(service.export(key.id, format), key.id, format)


# --- team pages ----------------------------------------------------------------------------
@router.get("/team")
async def team_page(
    request: Request, session: Team, service: ServiceDep, days: int = 30
) -> Response:
    key = await service.keys.get(session.key_id)
    detail = await service.key_detail(key, _window(days), entries=200)
    requests = [e for e in detail.entries if e.event in ("settle", "release")][:50]
    return page(
        request, "team.html", session, detail=detail, requests=requests, days=days, windows=WINDOWS
    )


@router.get("/team/export")
async def export_team(
    session: Team, service: ServiceDep, format: ExportFormat = "csv"
) -> StreamingResponse:
    return await _export(service.export(session.key_id, format), session.key_id, format)


# --- wiring --------------------------------------------------------------------------------
def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard under ``/dashboard``; signed-out visitors go to the sign-in page."""

    async def _sign_in(request: Request, exc: Exception) -> Response:
        return redirect("/dashboard/login")

    app.add_exception_handler(SignInRequired, _sign_in)
    app.include_router(router)
