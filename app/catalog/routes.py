"""``GET /v1/models``: what can be called, at what price, with which limits."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.catalog.catalog import KNOWN_PARAMS, Catalog
from app.deps import CatalogDep, CurrentKey, SettingsDep
from app.money import format_usd
from app.schemas import error_responses
from app.settings import Settings

router = APIRouter(prefix="/v1", tags=["catalog"])


class ParameterLimits(BaseModel):
    num_images: tuple[int, int] = (1, 4)
    num_inference_steps: tuple[int, int]
    guidance_scale: tuple[float, float] = (0.0, 20.0)
    side_px: tuple[int, int] = (64, 4096)
    max_output_megapixels: str


class ModelInfo(BaseModel):
    id: str
    alias: str | None
    kind: Literal["model", "upscaler"]
    operations: list[str] = Field(examples=[["generate", "transform"]])
    upstream: dict[str, str] = Field(description="fal endpoint per operation.")
    unit_price_usd_per_mp: dict[str, str] = Field(description="USD per output MP per operation.")
    forwarded_params: dict[str, list[str]] = Field(
        description="Parameters sent upstream per operation; others are accepted, not forwarded."
    )
    ignored_params: dict[str, list[str]]
    limits: ParameterLimits | None
    allowed: bool = Field(description="Whether the calling key may use it.")


class ModelList(BaseModel):
    models: list[ModelInfo]


def describe(catalog: Catalog, settings: Settings, allowed: tuple[str, ...] | None) -> ModelList:
    out: list[ModelInfo] = []
    for m in catalog.models.values():
        ops = {"generate": m.text_to_image}
        prices = {"generate": format_usd(m.unit_price)}
        forwarded = {"generate": sorted(m.params)}
        ignored = {"generate": sorted(KNOWN_PARAMS - {"strength"} - m.params)}
        if m.image_to_image:
            ops["transform"] = m.image_to_image
            prices["transform"] = format_usd(catalog.transform_unit_price)
            forwarded["transform"] = sorted(m.image_to_image_params)
            ignored["transform"] = sorted(
                KNOWN_PARAMS - {"guidance_scale", "image_size"} - m.image_to_image_params
            )
        out.append(
            ModelInfo(
                id=m.id,
                alias=m.alias,
                kind="model",
                operations=list(ops),
                upstream=ops,
                unit_price_usd_per_mp=prices,
                forwarded_params=forwarded,
                ignored_params=ignored,
                limits=ParameterLimits(
                    num_inference_steps=(1, m.max_steps),
                    max_output_megapixels=str(settings.max_output_megapixels),
                ),
                allowed=allowed is None or m.id in allowed,
            )
        )
    for u in catalog.upscalers.values():
        out.append(
            ModelInfo(
                id=u.id,
                alias=None,
                kind="upscaler",
                operations=["upscale"],
                upstream={"upscale": u.endpoint},
                unit_price_usd_per_mp={"upscale": format_usd(catalog.upscale_unit_price)},
                forwarded_params={"upscale": sorted({"scale", *u.params})},
                ignored_params={"upscale": sorted({"output_format"} - u.params)},
                limits=None,
                allowed=allowed is None or u.id in allowed,
            )
        )
    return ModelList(models=out)


@router.get(
    "/models",
    operation_id="listModels",
    response_model=ModelList,
    responses=error_responses(401),
    summary="The model catalog",
)
async def list_models(key: CurrentKey, catalog: CatalogDep, settings: SettingsDep) -> ModelList:
    return describe(catalog, settings, key.models)
