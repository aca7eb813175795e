"""The dashboard's HTML forms, turned into the admin API's own key bodies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qs

from pydantic import ValidationError

from app.keys.schemas import KeyCreate, KeyUpdate

KEY_FIELDS = (
    "name",
    "budget_usd",
    "budget_period",
    "rpm",
    "max_concurrent",
    "models",
    "expires_at",
)
_COUNTS = ("rpm", "max_concurrent")
# Fields an edit may clear: blank means unlimited / the gateway default / every model / never.
_CLEARABLE = ("budget_usd", "rpm", "max_concurrent", "models", "expires_at")


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; the first value of each field."""
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items() if values}


def _models(value: str) -> list[str]:
    return [m for m in re.split(r"[\s,]+", value) if m]


def _raw_fields(form: Mapping[str, str], *, blanks_clear: bool) -> dict[str, object]:
    raw: dict[str, object] = {}
    for name in KEY_FIELDS:
        if name not in form:
            continue
        value = form[name].strip()
        if not value:
            if blanks_clear and name in _CLEARABLE:
                raw[name] = None
            continue
        if name == "models":
            raw[name] = _models(value)
        elif name in _COUNTS and value.isdigit():
            raw[name] = int(value)  # a form sends text; the admin API takes JSON numbers only
        else:
            raw[name] = value
    return raw


def key_create_from_form(form: Mapping[str, str]) -> KeyCreate:
    """Blank fields are left out (the admin API's defaults apply)."""
    return KeyCreate.model_validate(_raw_fields(form, blanks_clear=False))


def key_update_from_form(form: Mapping[str, str]) -> KeyUpdate:
    """Every field the form sent is set; a blank limit clears it."""
    return KeyUpdate.model_validate(_raw_fields(form, blanks_clear=True))


def form_error(exc: ValidationError) -> str:
    """The first problem, as a sentence naming the field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or "form"
    return f"{field}: {first.get('msg', 'is invalid')}."
