"""The model catalog: built-in defaults, extended or overridden by an operator's TOML file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from app.errors import InvalidRequest, ModelNotFound
from app.money import parse_usd

#: Every request parameter a text-to-image or image-to-image endpoint may take.
KNOWN_PARAMS = frozenset(
    {
        "image_size",
        "num_images",
        "num_inference_steps",
        "guidance_scale",
        "output_format",
        "seed",
        "strength",
    }
)
MAX_STEPS = 100
DEFAULT_STEPS = 28
#: fal input fields an endpoint is assumed to take (besides its priced ones) when its catalog
#: entry does not list them: the switches nearly every fal image model has.
DEFAULT_FAL_FIELDS = ("sync_mode", "enable_safety_checker")
FalKind = Literal["text_to_image", "image_to_image", "upscale"]


class CatalogError(ValueError):
    """The catalog file is malformed; raised at startup, never while serving."""


@dataclass(frozen=True)
class ModelEntry:
    """A text-to-image model and, optionally, its image-to-image sibling endpoint."""

    id: str
    alias: str | None
    text_to_image: str
    image_to_image: str | None
    unit_price: int  # micro-dollars per megapixel of output
    params: frozenset[str]
    image_to_image_params: frozenset[str]
    format_param: str = "output_format"
    max_steps: int = MAX_STEPS
    default_steps: int = DEFAULT_STEPS
    # fal input fields each endpoint accepts on fal's own API (``/fal/...``), price-deciding
    # ones included; ``fal_image_size`` is the endpoint's own default size on that API.
    fal_fields: frozenset[str] = frozenset()
    image_to_image_fal_fields: frozenset[str] = frozenset()
    fal_image_size: str = "landscape_4_3"


@dataclass(frozen=True)
class UpscalerEntry:
    id: str
    endpoint: str
    factor_param: str
    params: frozenset[str]
    fal_fields: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FalEndpoint:
    """A fal endpoint id served on fal's own API, with the catalog entry that prices it.

    ``fields`` are the fal input fields it accepts; the price-deciding ones among them are
    validated like ``/v1``, the rest are passed on to fal as sent.
    """

    id: str
    kind: FalKind
    model: ModelEntry | None
    upscaler: UpscalerEntry | None
    fields: frozenset[str]


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelEntry]
    upscalers: dict[str, UpscalerEntry]
    transform_unit_price: int  # micro-dollars per megapixel of output
    upscale_unit_price: int

    def model(self, name: str) -> ModelEntry:
        """Find a model by id or alias; unknown names are a 404 naming ``model``."""
        entry = self.models.get(name)
        if entry is None:
            entry = next((m for m in self.models.values() if m.alias == name), None)
        if entry is None:
            raise ModelNotFound(f"Unknown model '{_clip(name)}'.", param="model")
        return entry

    def transform_model(self, name: str) -> ModelEntry:
        entry = self.model(name)
        if entry.image_to_image is None:
            raise InvalidRequest(
                f"Model '{entry.id}' does not support image-to-image.", param="model"
            )
        return entry

    def upscaler(self, name: str) -> UpscalerEntry:
        entry = self.upscalers.get(name)
        if entry is None:
            raise ModelNotFound(f"Unknown upscaler '{_clip(name)}'.", param="model")
        return entry

    @cached_property
    def fal_endpoints(self) -> dict[str, FalEndpoint]:
        """Every fal endpoint id the catalog prices: each model's text-to-image and
        image-to-image endpoints and each upscaler's endpoint (first declaration wins)."""
        found: dict[str, FalEndpoint] = {}
        for m in self.models.values():
            found.setdefault(
                m.text_to_image,
                FalEndpoint(m.text_to_image, "text_to_image", m, None, m.fal_fields),
            )
            if m.image_to_image is not None:
                found.setdefault(
                    m.image_to_image,
                    FalEndpoint(
                        m.image_to_image, "image_to_image", m, None, m.image_to_image_fal_fields
                    ),
                )
        for u in self.upscalers.values():
            found.setdefault(u.endpoint, FalEndpoint(u.endpoint, "upscale", None, u, u.fal_fields))
        return found

    def fal_endpoint(self, endpoint_id: str) -> FalEndpoint:
        """A fal endpoint id the catalog prices; any other is a 404."""
        entry = self.fal_endpoints.get(endpoint_id.strip("/"))
        if entry is None:
            raise ModelNotFound(
                f"Application '{_clip(endpoint_id)}' is not available on this gateway.",
                param="model",
            )
        return entry


def _clip(name: str) -> str:
    return name if len(name) <= 100 else name[:100] + "..."


def _price(raw: Any, where: str) -> int:
    try:
        micro = parse_usd(raw)
    except ValueError as exc:
        raise CatalogError(f"{where}: {exc}") from exc
    if micro < 0:
        raise CatalogError(f"{where}: price must not be negative")
    return micro


def _params(raw: Any, where: str) -> frozenset[str]:
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise CatalogError(f"{where}: params must be a list of strings")
    unknown = set(raw) - KNOWN_PARAMS
    if unknown:
        raise CatalogError(f"{where}: unknown params {sorted(unknown)}")
    return frozenset(raw)


def _fal_fields(
    raw: Any, priced: frozenset[str], extra: tuple[str, ...], where: str
) -> frozenset[str]:
    """The fal input fields an endpoint accepts: the listed ones, else its priced params plus
    ``extra`` and the common switches."""
    if raw is None:
        return frozenset({*priced, *extra, *DEFAULT_FAL_FIELDS})
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise CatalogError(f"{where}: fal_fields must be a list of strings")
    return frozenset(raw)


def _model(raw: dict[str, Any]) -> ModelEntry:
    where = f"model {raw.get('id')!r}"
    try:
        max_steps = int(raw.get("max_steps", MAX_STEPS))
        if not 1 <= max_steps <= MAX_STEPS:
            raise CatalogError(f"{where}: max_steps must be 1..{MAX_STEPS}")
        params = _params(raw.get("params", sorted(KNOWN_PARAMS - {"strength"})), where)
        i2i_params = _params(raw.get("image_to_image_params", []), where)
        format_param = str(raw.get("format_param", "output_format"))

        def fal_names(taken: frozenset[str]) -> frozenset[str]:
            return frozenset(format_param if p == "output_format" else p for p in taken)

        return ModelEntry(
            id=str(raw["id"]),
            alias=raw.get("alias"),
            text_to_image=str(raw["text_to_image"]),
            image_to_image=raw.get("image_to_image"),
            unit_price=_price(raw["usd_per_mp"], where),
            params=params,
            image_to_image_params=i2i_params,
            format_param=format_param,
            max_steps=max_steps,
            default_steps=min(int(raw.get("default_steps", DEFAULT_STEPS)), max_steps),
            fal_fields=_fal_fields(raw.get("fal_fields"), fal_names(params), ("prompt",), where),
            image_to_image_fal_fields=_fal_fields(
                raw.get("image_to_image_fal_fields"),
                fal_names(i2i_params),
                ("prompt", "image_url"),
                where,
            ),
            fal_image_size=str(raw.get("fal_image_size", "landscape_4_3")),
        )
    except KeyError as exc:
        raise CatalogError(f"{where}: missing {exc.args[0]!r}") from exc


def _upscaler(raw: dict[str, Any]) -> UpscalerEntry:
    where = f"upscaler {raw.get('id')!r}"
    try:
        params = _params(raw.get("params", []), where)
        factor_param = str(raw.get("factor_param", "upscale_factor"))
        return UpscalerEntry(
            id=str(raw["id"]),
            endpoint=str(raw["endpoint"]),
            factor_param=factor_param,
            params=params,
            fal_fields=_fal_fields(
                raw.get("fal_fields"), params, ("image_url", factor_param), where
            ),
        )
    except KeyError as exc:
        raise CatalogError(f"{where}: missing {exc.args[0]!r}") from exc


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "operations": {**base.get("operations", {}), **override.get("operations", {})}
    }
    for section in ("models", "upscalers"):
        entries = {e["id"]: e for e in base.get(section, [])}
        for entry in override.get(section, []):
            if "id" not in entry:
                raise CatalogError(f"an entry in [[{section}]] has no id")
            entries[entry["id"]] = entry
        merged[section] = list(entries.values())
    return merged


def load_catalog(path: Path | None = None) -> Catalog:
    """The built-in catalog, with the operator's file (if any) laid over it by id."""
    text = resources.files("app.catalog").joinpath("default_catalog.toml").read_text()
    data = tomllib.loads(text)
    if path is not None:
        try:
            data = _merge(data, tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CatalogError(f"cannot read catalog file {path}: {exc}") from exc
    ops = data.get("operations", {})
    models = [_model(m) for m in data.get("models", [])]
    aliases = [m.alias for m in models if m.alias]
    if len(aliases) != len(set(aliases)):
        raise CatalogError("two models share an alias")
    return Catalog(
        models={m.id: m for m in models},
        upscalers={u.id: u for u in (_upscaler(u) for u in data.get("upscalers", []))},
        transform_unit_price=_price(ops.get("transform_usd_per_mp", "0.045"), "operations"),
        upscale_unit_price=_price(ops.get("upscale_usd_per_mp", "0.03"), "operations"),
    )
