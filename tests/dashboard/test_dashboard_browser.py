"""The dashboard in a real headless Chromium against a live ``falgate serve`` (issue 14).

Each test signs in through the form like a person would; amounts on the pages are compared
with what the admin API answers at the same moment, to the micro-dollar.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ADMIN_TOKEN, Gateway
from tests.dashboard.conftest import Browser, Traffic, admin_get


def _wait(browser: Browser) -> WebDriverWait:  # type: ignore[type-arg]
    return WebDriverWait(browser.driver, 15)


def _replaced(old: WebElement) -> Callable[[WebDriver], bool]:
    """Whether the page holding ``old`` has been replaced by the next one. Selenium's
    ``staleness_of`` only knows the stale-element error; mid-navigation, chromedriver may
    instead answer that the node "does not belong to the document": the same fact."""

    def gone(_driver: WebDriver) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc.msg):
                return True
            raise
        return False

    return gone


def _text(browser: Browser, css: str) -> str:
    return str(browser.driver.find_element(By.CSS_SELECTOR, css).text)


def sign_in(browser: Browser, token: str, landing: str) -> None:
    browser.get("/dashboard")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "token")))
    browser.driver.find_element(By.ID, "token").send_keys(token)
    browser.driver.find_element(By.ID, "sign-in").click()
    _wait(browser).until(ec.url_contains(landing))


def _submit(browser: Browser, form_id: str, fields: dict[str, str]) -> None:
    form = browser.driver.find_element(By.ID, form_id)
    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    old = browser.driver.find_element(By.TAG_NAME, "html")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser).until(_replaced(old))


def _post_form(browser: Browser, action: str, fields: dict[str, str]) -> None:
    """Submit a form built in the current page (so it is same-origin, cookie and all)."""
    old = browser.driver.find_element(By.TAG_NAME, "html")
    browser.driver.execute_script(
        """
        const [action, fields] = arguments;
        const form = document.createElement("form");
        form.method = "post";
        form.action = action;
        for (const [name, value] of Object.entries(fields)) {
            const input = document.createElement("input");
            input.type = "hidden"; input.name = name; input.value = value;
            form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();
        """,
        action,
        fields,
    )
    _wait(browser).until(_replaced(old))


def _envelope(browser: Browser) -> dict[str, object]:
    """The JSON error body the browser is showing."""
    body = json.loads(browser.driver.find_element(By.TAG_NAME, "body").text)
    assert set(body) == {"error"}, body
    error: dict[str, object] = body["error"]
    return error


def _day_start(days_ago: int = 0) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days_ago)).isoformat()


def test_operator_overview_totals_equal_admin_usage(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    sign_in(browser, ADMIN_TOKEN, "/dashboard/overview")

    # The session lives in an HttpOnly, SameSite=Strict cookie that holds no token.
    cookies = {c["name"]: c for c in browser.driver.get_cookies()}
    session = cookies["falgate_dashboard"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert all(ADMIN_TOKEN not in c["value"] for c in cookies.values())
    stored = browser.driver.execute_script(
        "return [document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage)]"
    )
    assert stored == ["", "{}", "{}"]

    today = admin_get(dashboard_gateway, "/admin/usage", **{"from": _day_start()}).json()
    month_start = datetime.now(UTC).date().replace(day=1).isoformat()
    month = admin_get(dashboard_gateway, "/admin/usage", **{"from": month_start}).json()
    window = admin_get(
        dashboard_gateway, "/admin/usage", **{"from": _day_start(29), "group_by": "key"}
    ).json()
    assert today["total"]["requests"] == 5
    assert _text(browser, "#spend-today") == today["total"]["amount_usd"]
    assert _text(browser, "#spend-month") == month["total"]["amount_usd"]
    assert _text(browser, "#window-total") == window["total"]["amount_usd"]

    # Top keys: one row per key with exactly its settled amount.
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#top-keys tbody tr[data-key]")
    shown = {
        r.get_attribute("data-key"): r.find_element(By.CSS_SELECTOR, ".amount").text for r in rows
    }
    assert shown == {row["key"]: row["amount_usd"] for row in window["rows"]}
    by_model = admin_get(
        dashboard_gateway, "/admin/usage", **{"from": _day_start(29), "group_by": "model"}
    ).json()
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#top-models tbody tr[data-model]")
    shown = {
        r.get_attribute("data-model"): r.find_element(By.CSS_SELECTOR, ".amount").text for r in rows
    }
    assert shown == {row["model"]: row["amount_usd"] for row in by_model["rows"]}

    # The budget card sums the active keys' budgets: 5 + 0.01.
    assert _text(browser, "#budgets-total") == "5.010000"
    # Refused by reason, as this process counted them; nothing held after the traffic.
    assert _text(browser, "#refusals [data-status='402'] td") == "1"
    assert _text(browser, "#refusals [data-status='429'] td") == "1"
    assert _text(browser, "#refusals [data-status='503'] td") == "0"
    assert _text(browser, "#holds-count") == "0"

    # The chart is server-side SVG with one bar segment per key today.
    segments = browser.driver.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    assert len(segments) == 3
    browser.screenshot("dashboard-overview.png")

    # The 90-day window stacked by model shows the same money.
    browser.get("/dashboard/overview?days=90&stack=model")
    assert _text(browser, "#window-total") == window["total"]["amount_usd"]
    legend = _text(browser, "ul.legend")
    for row in by_model["rows"]:
        assert row["model"] in legend and row["amount_usd"] in legend

    # The keys table: spent per key as /v1/usage reports it, sortable by spend.
    browser.get("/dashboard/keys?sort=spent&order=desc")
    names = [
        e.text
        for e in browser.driver.find_elements(By.CSS_SELECTOR, "#keys tbody td:first-child a")
    ]
    assert names[:3] == ["team-design", "team-research", "team-intern"]
    for name, (key_id, secret) in traffic.keys.items():
        with dashboard_gateway.client(secret) as client:
            usage = client.get("/v1/usage").json()
        row = f"#keys tr[data-key-id='{key_id}']"
        assert _text(browser, f"{row} .spent") == usage["spent_usd"], name
        assert _text(browser, f"{row} .remaining") == (usage["remaining_usd"] or "unlimited")


def test_key_page_shows_its_spend_and_ledger(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    sign_in(browser, ADMIN_TOKEN, "/dashboard/overview")
    key_id, _ = traffic.keys["team-design"]
    browser.get(f"/dashboard/keys/{key_id}")
    report = admin_get(dashboard_gateway, "/admin/usage", key_id=key_id, group_by="model").json()
    assert _text(browser, "#key-window-total") == report["total"]["amount_usd"]
    assert _text(browser, "#key-budget") == "5.000000"
    ledger = _text(browser, "#ledger")
    for request_id in traffic.request_ids["team-design"]:
        assert request_id in ledger
    for other in ("team-research", "team-intern"):
        for request_id in traffic.request_ids[other]:
            assert request_id not in ledger
    browser.screenshot("dashboard-key.png")


def _downloaded(folder: Path, suffix: str) -> Path:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.name.endswith(suffix)]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} download in {sorted(folder.iterdir())}")


def test_create_use_edit_export_and_revoke_a_key(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    sign_in(browser, ADMIN_TOKEN, "/dashboard/overview")
    browser.driver.find_element(By.LINK_TEXT, "New key").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "create-key")))
    _submit(browser, "create-key", {"name": "team-new", "budget_usd": "1", "rpm": "60"})

    secret = _text(browser, "#new-key-secret")
    assert secret.startswith("fgk_")
    browser.driver.find_element(By.ID, "copy-key").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.ID, "copy-key"), "Copied"))
    browser.driver.find_element(By.ID, "to-key-page").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "key-spent")))
    key_id = browser.driver.current_url.rsplit("/", 1)[-1]
    assert _text(browser, "#key-spent") == "0.000000"

    # The key works, and its spend appears on its page.
    with dashboard_gateway.client(secret) as client:
        response = client.post("/v1/generate", json={"prompt": "a red fox", "model": "flux-dev"})
    assert response.status_code == 200, response.text
    cost = response.json()["cost"]["amount_usd"]
    browser.driver.refresh()
    assert _text(browser, "#key-spent") == cost
    assert response.headers["X-Request-Id"] in _text(browser, "#ledger")
    with dashboard_gateway.client(secret) as client:
        usage = client.get("/v1/usage").json()
    assert _text(browser, "#key-remaining") == usage["remaining_usd"]

    # Change its budget and limits.
    _submit(browser, "edit-key", {"budget_usd": "2.5", "max_concurrent": "3"})
    assert _text(browser, "#saved") == "Saved."
    assert _text(browser, "#key-budget") == "2.500000"
    record = admin_get(dashboard_gateway, f"/admin/keys/{key_id}").json()
    assert (record["budget_usd"], record["rpm"], record["max_concurrent"]) == ("2.500000", 60, 3)

    # A bad value is refused on the page, changing nothing.
    _submit(browser, "edit-key", {"budget_usd": "lots"})
    assert "budget_usd" in _text(browser, ".error")
    assert admin_get(dashboard_gateway, f"/admin/keys/{key_id}").json()["budget_usd"] == "2.500000"

    # The export download is the key's ledger, as the admin API exports it.
    browser.get(f"/dashboard/keys/{key_id}")
    browser.driver.find_element(By.ID, "export-csv").click()
    downloaded = _downloaded(browser.downloads, f"ledger-{key_id}.csv").read_bytes()
    expected = admin_get(dashboard_gateway, "/admin/ledger", key_id=key_id, format="csv").content
    assert downloaded == expected
    rows = list(csv.DictReader(io.StringIO(downloaded.decode())))
    assert [r["event"] for r in rows] == ["hold", "settle"]
    assert rows[1]["amount_usd"] == cost

    # Revoke, with a confirmation step; the key stops working at once.
    browser.driver.find_element(By.ID, "revoke-key").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "confirm-revoke")))
    browser.driver.find_element(By.ID, "confirm-revoke").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.ID, "key-status"), "revoked"))
    with dashboard_gateway.client(secret) as client:
        assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 401
    assert admin_get(dashboard_gateway, f"/admin/keys/{key_id}").json()["status"] == "revoked"


def test_team_sign_in_sees_only_its_own_key(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    key_id, secret = traffic.keys["team-design"]
    sign_in(browser, secret, "/dashboard/team")
    with dashboard_gateway.client(secret) as client:
        usage = client.get("/v1/usage").json()
    assert _text(browser, "#team-spent") == usage["spent_usd"]
    assert _text(browser, "#team-remaining") == usage["remaining_usd"]
    assert _text(browser, "#team-budget") == usage["budget_usd"]
    report = admin_get(dashboard_gateway, "/admin/usage", key_id=key_id).json()
    assert _text(browser, "#team-window-total") == report["total"]["amount_usd"]
    requests = _text(browser, "#requests")
    for request_id in traffic.request_ids["team-design"]:
        assert request_id in requests

    # Nothing of the other keys anywhere in the page.
    source = browser.driver.page_source
    for name, (other_id, _) in traffic.keys.items():
        if name == "team-design":
            continue
        assert name not in source and other_id not in source
        for request_id in traffic.request_ids[name]:
            assert request_id not in source
    browser.screenshot("dashboard-team.png")

    # A gateway key's session cannot open operator pages or another key's page.
    for path in (
        "/dashboard/overview",
        "/dashboard/keys",
        f"/dashboard/keys/{traffic.keys['team-intern'][0]}",
    ):
        browser.get(path)
        error = _envelope(browser)
        assert error["type"] == "forbidden", path

    # Its own export only.
    browser.get("/dashboard/team")
    browser.driver.find_element(By.ID, "export-jsonl").click()
    lines = _downloaded(browser.downloads, f"ledger-{key_id}.jsonl").read_text().splitlines()
    assert {json.loads(line)["key_id"] for line in lines} == {key_id}


def test_changes_without_the_csrf_token_are_refused(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    sign_in(browser, ADMIN_TOKEN, "/dashboard/overview")
    key_id, secret = traffic.keys["team-intern"]
    before = admin_get(dashboard_gateway, "/admin/keys").json()["keys"]
    # Forms posted from a signed-in dashboard page: the session cookie goes along, the CSRF
    # token does not (missing, then wrong, then empty).
    attempts = [
        ("/dashboard/keys", {"name": "sneaky"}),
        (f"/dashboard/keys/{key_id}/revoke", {"csrf_token": "not-the-token"}),
        (f"/dashboard/keys/{key_id}", {"csrf_token": "", "budget_usd": "999"}),
        ("/dashboard/logout", {}),
    ]
    for action, fields in attempts:
        browser.get("/dashboard/keys")
        _post_form(browser, action, fields)
        error = _envelope(browser)
        assert error["type"] == "forbidden" and "CSRF" in str(error["message"]), action
    after = admin_get(dashboard_gateway, "/admin/keys").json()["keys"]
    assert after == before
    with dashboard_gateway.client(secret) as client:
        assert client.get("/v1/usage").status_code == 200

    # Sign-in itself needs the sign-in page's token.
    response = httpx.post(
        f"{dashboard_gateway.url}/dashboard/login",
        data={"token": ADMIN_TOKEN},
        follow_redirects=False,
    )
    assert response.status_code == 403 and response.json()["error"]["type"] == "forbidden"


def test_gateway_keys_and_signed_out_visitors_get_no_operator_page(
    browser: Browser, dashboard_gateway: Gateway, traffic: Traffic
) -> None:
    _, secret = traffic.keys["team-research"]
    # A gateway key (or the admin token) as a header is not a dashboard session.
    for token in (secret, ADMIN_TOKEN):
        with dashboard_gateway.client(token) as client:
            for path in ("/dashboard/overview", "/dashboard/keys", "/dashboard/team"):
                response = client.get(path, follow_redirects=False)
                assert response.status_code == 303, path
                assert response.headers["location"] == "/dashboard/login"

    # A wrong token is refused on the sign-in page.
    browser.get("/dashboard/login")
    browser.driver.find_element(By.ID, "token").send_keys("fgk_not-a-real-key")
    browser.driver.find_element(By.ID, "sign-in").click()
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".error")))
    assert "/dashboard/login" in browser.driver.current_url

    # Signing out ends the session on the server: the old cookie no longer opens anything.
    sign_in(browser, ADMIN_TOKEN, "/dashboard/overview")
    cookie = browser.driver.get_cookie("falgate_dashboard")
    assert cookie is not None
    browser.driver.find_element(By.ID, "sign-out").click()
    _wait(browser).until(ec.url_contains("/dashboard/login"))
    browser.get("/dashboard/overview")
    assert "/dashboard/login" in browser.driver.current_url
    replay = httpx.get(
        f"{dashboard_gateway.url}/dashboard/overview",
        cookies={"falgate_dashboard": cookie["value"]},
        follow_redirects=False,
    )
    assert replay.status_code == 303 and replay.headers["location"] == "/dashboard/login"
