"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) against a live gateway.

The gateway has a Redis of its own, so the dashboard shows exactly the traffic these tests make
and the screenshots in ``docs/`` are readable. Selenium is given the driver's path, so Selenium
Manager never downloads anything. Without Chromium the tests are skipped on a developer's
machine and FAIL under ``CI=true`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from app.redis import EmbeddedRedis
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayFactory, Sandbox

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Test artefacts (git ignores them); FALGATE_SCREENSHOT_DIR=docs refreshes the README's copies.
DOCS = Path(
    os.environ.get("FALGATE_SCREENSHOT_DIR")
    or Path(__file__).resolve().parents[2] / "test-artifacts"
)


def _require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Browser:
    """One Chromium with its own cookie jar and download folder."""

    driver: webdriver.Chrome
    base: str
    downloads: Path

    def get(self, path: str) -> None:
        self.driver.get(self.base + path)

    def screenshot(self, name: str) -> Path:
        """A full-page PNG, a test artefact (the README shows copies kept in docs/)."""
        driver = self.driver
        height, chrome = driver.execute_script(
            "return [document.documentElement.scrollHeight,"
            " window.outerHeight - window.innerHeight]"
        )
        driver.set_window_size(1280, max(int(height) + int(chrome), 600))
        DOCS.mkdir(parents=True, exist_ok=True)
        path = DOCS / name
        driver.save_screenshot(str(path))
        driver.set_window_size(1280, 900)
        return path


@pytest.fixture(scope="module")
def dashboard_gateway(
    tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox
) -> Iterator[Gateway]:
    redis = EmbeddedRedis(tmp_path_factory.mktemp("dashboard-redis"), persist=False)
    redis.start()
    factory = GatewayFactory(tmp_path_factory.mktemp("dashboard-gw"), redis.url, sandbox)
    try:
        yield factory.start()
    finally:
        factory.stop_all()
        redis.stop()


@pytest.fixture(scope="module")
def chromium(
    tmp_path_factory: pytest.TempPathFactory, dashboard_gateway: Gateway
) -> Iterator[Browser]:
    _require_chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("chromium-downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield Browser(driver=driver, base=dashboard_gateway.url, downloads=downloads)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium: Browser) -> Browser:
    """The module's Chromium, signed out (no cookies) at the start of each test."""
    chromium.get("/dashboard/login")
    chromium.driver.delete_all_cookies()
    return chromium


@dataclass(frozen=True)
class Traffic:
    """Keys with settled spend on them, made through the public API."""

    keys: dict[str, tuple[str, str]]  # name -> (id, secret)
    request_ids: dict[str, list[str]]  # name -> X-Request-Id of its successes


def _generate(gateway: Gateway, secret: str, **body: object) -> httpx.Response:
    with gateway.client(secret) as client:
        return client.post("/v1/generate", json={"prompt": "a lighthouse at dusk", **body})


@pytest.fixture(scope="module")
def traffic(dashboard_gateway: Gateway) -> Traffic:
    gw = dashboard_gateway
    keys = {
        "team-design": gw.create_key(name="team-design", budget_usd="5", budget_period="monthly"),
        "team-research": gw.create_key(name="team-research", rpm=1),
        "team-intern": gw.create_key(name="team-intern", budget_usd="0.01", budget_period="daily"),
    }
    plan = {
        "team-design": [
            {"model": "flux-dev"},
            {"model": "flux-dev", "image_size": "square_hd"},
            {"model": "sdxl", "num_images": 2},
        ],
        "team-research": [{"model": "flux-pro"}],
        "team-intern": [{"model": "flux-schnell"}],
    }
    request_ids: dict[str, list[str]] = {}
    for name, bodies in plan.items():
        for body in bodies:
            response = _generate(gw, keys[name][1], **body)
            assert response.status_code == 200, response.text
            request_ids.setdefault(name, []).append(response.headers["X-Request-Id"])
    # One refusal of each kind the overview counts by reason (a fresh process: exact counts).
    assert _generate(gw, keys["team-intern"][1], model="flux-pro").status_code == 402
    assert _generate(gw, keys["team-research"][1], model="flux-dev").status_code == 429
    return Traffic(keys=keys, request_ids=request_ids)


def admin_get(gateway: Gateway, path: str, **params: str) -> httpx.Response:
    with gateway.client(ADMIN_TOKEN) as client:
        response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response
