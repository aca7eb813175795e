"""The dashboard's pure parts: SVG charts, form parsing, and the assets the package ships."""

from __future__ import annotations

import fnmatch
import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.dashboard.charts import OTHER, PALETTE, Series, gauge, stacked_bars, top_series
from app.dashboard.schemas import (
    form_error,
    key_create_from_form,
    key_update_from_form,
    parse_form,
)

ROOT = Path(__file__).resolve().parents[2]
DAYS = [date(2026, 11, 29), date(2026, 11, 30), date(2026, 12, 1)]


def test_bar_titles_carry_exact_amounts_and_names_are_escaped() -> None:
    series = [Series("<team & co>", PALETTE[0], {DAYS[2]: 11797, DAYS[0]: 1})]
    svg = str(stacked_bars(DAYS, series, label="spend"))
    assert "2026-12-01 · &lt;team &amp; co&gt;: 0.011797 USD" in svg
    assert "2026-11-29 · &lt;team &amp; co&gt;: 0.000001 USD" in svg
    assert "<team" not in svg
    # Axis top is the next 1/2/5 step above the largest day: 0.02.
    assert ">0.020000</text>" in svg and ">0.000000</text>" in svg
    assert svg.count("<rect") == 2  # nothing drawn for the empty day


def test_stacks_fold_beyond_the_palette_into_other() -> None:
    by_name = {f"k{i}": {DAYS[0]: 100 * (i + 1)} for i in range(len(PALETTE) + 3)}
    series = top_series(by_name)
    assert len(series) == len(PALETTE) + 1
    assert series[0].name == f"k{len(PALETTE) + 2}"  # largest first
    assert series[-1].name == OTHER
    assert series[-1].by_day[DAYS[0]] == 100 + 200 + 300
    assert sum(s.total for s in series) == sum(d[DAYS[0]] for d in by_name.values())


def test_gauge_clamps_and_handles_unlimited() -> None:
    assert 'width="200.0"' in str(gauge(5, 1, label="over"))
    assert 'width="100.0"' in str(gauge(1, 2, label="half"))
    assert 'width="0.0"' in str(gauge(7, None, label="unlimited"))


def test_create_form_leaves_blanks_to_the_api_defaults() -> None:
    form = parse_form(
        b"name=team-a&budget_usd=12.5&budget_period=daily&rpm=&models=flux-dev%2C+sdxl"
    )
    body = key_create_from_form(form)
    assert body.model_fields_set == {"name", "budget_usd", "budget_period", "models"}
    assert body.budget_usd == Decimal("12.5")
    assert body.models == ["flux-dev", "sdxl"]


def test_update_form_blanks_clear_limits_but_not_the_name() -> None:
    form = parse_form(
        b"csrf_token=x&name=team-b&budget_usd=&rpm=&max_concurrent=4&models=&expires_at="
    )
    body = key_update_from_form(form)
    assert body.name == "team-b" and body.max_concurrent == 4
    assert {"budget_usd", "rpm", "models", "expires_at"} <= body.model_fields_set
    assert body.budget_usd is None and body.rpm is None
    assert key_update_from_form(parse_form(b"name=")).model_fields_set == set()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"name=a&budget_usd=1.0000001", "budget_usd"),
        (b"name=a&rpm=fast", "rpm"),
        (b"budget_usd=1", "name"),
        (b"name=a&budget_period=weekly", "budget_period"),
    ],
)
def test_form_errors_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        key_create_from_form(parse_form(raw))
    assert form_error(caught.value).startswith(field + ":")


def test_every_dashboard_asset_is_package_data() -> None:
    """Templates and static files ship in the wheel (the dashboard works offline)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app.dashboard"]
    folder = ROOT / "app" / "dashboard"
    assets = [
        p.relative_to(folder).as_posix()
        for sub in ("templates", "static")
        for p in (folder / sub).iterdir()
    ]
    assert assets
    for asset in assets:
        assert any(fnmatch.fnmatch(asset, pattern) for pattern in patterns), asset
