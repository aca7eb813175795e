"""Request and response bodies of the client API (SPEC section 3)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from app.catalog.pricing import IMAGE_SIZE_PRESETS
from app.schemas import WholeNumber, whole_number

SEED_LIMIT = 2**64

# Constraints before the validator, so that the document shows them as minimum/maximum.
Steps = Annotated[int, Field(ge=1, le=100), BeforeValidator(whole_number)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT), BeforeValidator(whole_number)]
Preset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
OutputFormat = Literal["jpeg", "png"]
# Not blank: at least one character that is not whitespace (``str.isspace``), as ``\S`` means.
Prompt = Annotated[
    str,
    StringConstraints(min_length=1, max_length=10_000),
    Field(json_schema_extra={"pattern": r"\S"}),
]
#: What ``_check_image_url`` lets through, for the document.
IMAGE_URL_PATTERN = "^([Hh][Tt][Tt][Pp][Ss]?://|[Dd][Aa][Tt][Aa]:)"
ImageUrl = Annotated[
    str,
    Field(
        description="https://, http:// or data: URI of a JPEG, PNG or WebP.",
        json_schema_extra={"pattern": IMAGE_URL_PATTERN},
    ),
]


class _Body(BaseModel):
    # Strict: "2" is not a number and unknown fields are mistakes, not extensions.
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageSizeObject(_Body):
    width: WholeNumber = Field(ge=64, le=4096, description="Output width in pixels.")
    height: WholeNumber = Field(ge=64, le=4096, description="Output height in pixels.")


ImageSize = Preset | ImageSizeObject


def image_dimensions(size: ImageSize) -> tuple[int, int]:
    if isinstance(size, ImageSizeObject):
        return size.width, size.height
    return IMAGE_SIZE_PRESETS[size]


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("must not be blank")
    return prompt


class GenerateRequest(_Body):
    """Text-to-image. On ``/v1/run/{model_id}`` the ``model`` field is optional."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dawn, watercolour",
                    "image_size": "landscape_4_3",
                    "num_images": 1,
                }
            ]
        }
    )

    prompt: Prompt
    model: str | None = Field(default=None, max_length=200, description="Catalog id or alias.")
    image_size: ImageSize = "landscape_4_3"
    num_images: WholeNumber = Field(default=1, ge=1, le=4)
    num_inference_steps: Steps | None = Field(
        default=None, description="Defaults to 28, or the model's own default."
    )
    guidance_scale: float = Field(default=3.5, ge=0, le=20, allow_inf_nan=False)
    output_format: OutputFormat = "jpeg"
    seed: Seed | None = None

    _check_prompt = field_validator("prompt")(_not_blank)


class TransformRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://example.com/photo.jpg",
                    "prompt": "the same scene in winter",
                    "strength": 0.75,
                }
            ]
        }
    )

    image_url: ImageUrl
    prompt: Prompt
    model: str = Field(default="fal-ai/flux/dev", max_length=200)
    image_size: ImageSize = "landscape_4_3"
    strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
    num_inference_steps: Steps | None = None
    num_images: WholeNumber = Field(default=1, ge=1, le=4)
    output_format: OutputFormat = "jpeg"
    seed: Seed | None = None

    _check_prompt = field_validator("prompt")(_not_blank)

    @field_validator("image_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_image_url(value)


class UpscaleRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"image_url": "https://example.com/photo.png", "scale": 2}]}
    )

    image_url: ImageUrl
    model: str = Field(default="topaz", max_length=200, description="topaz, esrgan or clarity.")
    scale: Annotated[Literal[2, 4], BeforeValidator(whole_number)] = 2
    output_format: OutputFormat = "jpeg"

    @field_validator("image_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_image_url(value)


def _check_image_url(value: str) -> str:
    if re.match(IMAGE_URL_PATTERN, value) is None:
        raise ValueError("must be an https://, http:// or data: URI")
    return value


# --- responses ------------------------------------------------------------------------------


class ImageOut(BaseModel):
    url: str
    width: int
    height: int
    content_type: str


class Cost(BaseModel):
    amount_usd: str = Field(examples=["0.011797"], description="Micro-dollar exact, 6 places.")
    megapixels: float = Field(examples=[0.786432])


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    seed: int | None
    prompt: str
    cost: Cost


class UpscaleResponse(BaseModel):
    image: ImageOut
    cost: Cost


class PriceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "price": "$0.012",
                    "currency": "USD",
                    "amount_usd": "0.011797",
                    "megapixels": 0.786432,
                    "model": "fal-ai/flux/dev",
                    "unit_price_usd_per_mp": "0.015000",
                }
            ]
        }
    )

    price: str
    currency: Literal["USD"] = "USD"
    amount_usd: str
    megapixels: float
    model: str
    unit_price_usd_per_mp: str
