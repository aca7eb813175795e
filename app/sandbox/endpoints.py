"""The fal endpoints the sandbox emulates: their inputs (validated like fal's) and outputs.

Input schemas follow fal's published types (fal-protocol.md section 3); unknown fields are
ignored as fal's pydantic models do. Outputs have fal's shapes, including topaz answering with a
``File`` that has no width/height.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ImageFormat = Literal["jpeg", "png"]
ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
# fal's SDK caps each side of a custom size at 14142 px.
_MAX_SIDE = 14142
_SEED_LIMIT = 2**64


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageSize(_Input):
    width: int = Field(default=512, gt=0, le=_MAX_SIDE)
    height: int = Field(default=512, gt=0, le=_MAX_SIDE)


class FluxDevInput(_Input):
    prompt: str
    image_size: ImageSizePreset | ImageSize = "landscape_4_3"
    num_inference_steps: int = Field(default=28, ge=1, le=50)
    guidance_scale: float = Field(default=3.5, ge=0, le=20)
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int | None = Field(default=None, ge=0, lt=_SEED_LIMIT)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: ImageFormat = "jpeg"
    acceleration: Literal["none", "regular", "high"] = "none"


class FluxSchnellInput(FluxDevInput):
    num_inference_steps: int = Field(default=4, ge=1, le=12)


class FluxProInput(_Input):
    prompt: str
    image_size: ImageSizePreset | ImageSize = "landscape_4_3"
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int | None = Field(default=None, ge=0, lt=_SEED_LIMIT)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: ImageFormat = "jpeg"
    safety_tolerance: Literal["1", "2", "3", "4", "5", "6"] = "2"
    enhance_prompt: bool = False


class FastSdxlInput(_Input):
    prompt: str
    negative_prompt: str = ""
    image_size: ImageSizePreset | ImageSize = "square_hd"
    num_inference_steps: int = Field(default=25, ge=1, le=50)
    guidance_scale: float = Field(default=7.5, ge=0, le=20)
    num_images: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, lt=_SEED_LIMIT)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    expand_prompt: bool = False
    format: ImageFormat = "jpeg"


class FluxImageToImageInput(_Input):
    image_url: str
    prompt: str
    strength: float = Field(default=0.95, ge=0.01, le=1)
    num_inference_steps: int = Field(default=40, ge=1, le=50)
    guidance_scale: float = Field(default=3.5, ge=0, le=20)
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int | None = Field(default=None, ge=0, lt=_SEED_LIMIT)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: ImageFormat = "jpeg"
    acceleration: Literal["none", "regular", "high"] = "none"


class FastSdxlImageToImageInput(FastSdxlInput):
    image_url: str
    strength: float = Field(default=0.95, ge=0.05, le=1)
    preserve_aspect_ratio: bool = False
    crop_output: bool = False


class TopazUpscaleInput(_Input):
    image_url: str
    upscale_factor: float = Field(default=2, ge=1, le=4)
    model: Literal[
        "Standard V2",
        "Low Resolution V2",
        "CGI",
        "High Fidelity V2",
        "Text Refine",
        "Recovery",
        "Redefine",
        "Recovery V2",
        "Standard MAX",
        "Wonder",
    ] = "Standard V2"
    output_format: ImageFormat = "jpeg"
    crop_to_fill: bool = False
    face_enhancement: bool = True


class EsrganInput(_Input):
    image_url: str
    scale: float = Field(default=2, ge=1, le=8)
    model: Literal[
        "RealESRGAN_x4plus",
        "RealESRGAN_x2plus",
        "RealESRGAN_x4plus_anime_6B",
        "RealESRGAN_x4_v3",
        "RealESRGAN_x4_wdn_v3",
        "RealESRGAN_x4_anime_v3",
    ] = "RealESRGAN_x4plus"
    tile: int = Field(default=0, ge=0)
    face: bool = False
    output_format: ImageFormat = "png"


class ClarityUpscalerInput(_Input):
    image_url: str
    upscale_factor: float = Field(default=2, ge=1, le=4)
    prompt: str = "masterpiece, best quality, highres"
    negative_prompt: str = "(worst quality, low quality, normal quality:2)"
    creativity: float = Field(default=0.35, ge=0, le=1)
    resemblance: float = Field(default=0.6, ge=0, le=1)
    guidance_scale: float = Field(default=4, ge=0, le=20)
    num_inference_steps: int = Field(default=18, ge=4, le=50)
    seed: int | None = Field(default=None, ge=0, lt=_SEED_LIMIT)
    enable_safety_checker: bool = True


class ModelError(Exception):
    """The model rejected the request: becomes fal's ``{"detail": [...]}`` error."""

    def __init__(self, status_code: int, detail: list[dict[str, Any]] | str) -> None:
        super().__init__(str(detail))
        self.status_code = status_code
        self.detail = detail


def field_error(field: str, msg: str, type_: str = "value_error") -> ModelError:
    return ModelError(422, [{"loc": ["body", field], "msg": msg, "type": type_}])


@dataclass(frozen=True)
class SourceImage:
    """An input image as the sandbox loaded it."""

    data: bytes
    width: int
    height: int


ImageLoader = Callable[[str], Awaitable[SourceImage]]


@dataclass(frozen=True)
class OutputFile:
    """One generated file, as stored and served by the sandbox."""

    url: str
    file_name: str
    content_type: str
    file_size: int
    width: int
    height: int


@dataclass(frozen=True)
class Plan:
    """What to draw for one request: sizes, format, and the inputs of the deterministic art."""

    sizes: list[tuple[int, int]]
    image_format: ImageFormat
    seed: int
    prompt: str
    sync_mode: bool = False


class Endpoint:
    """One emulated fal endpoint."""

    input_model: type[_Input]

    def __init__(self, input_model: type[_Input]) -> None:
        self.input_model = input_model

    def validate(self, payload: Any) -> _Input:
        """Raises pydantic's ``ValidationError`` like fal's FastAPI would (a 422)."""
        return self.input_model.model_validate(payload)

    async def plan(self, args: Any, load_image: ImageLoader) -> Plan:
        raise NotImplementedError

    def respond(self, plan: Plan, files: list[OutputFile], inference_s: float) -> dict[str, Any]:
        raise NotImplementedError


def _size(image_size: str | ImageSize) -> tuple[int, int]:
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    return PRESETS[image_size]


def _seed_or_random(seed: int | None) -> int:
    # fal's own seeds span the whole unsigned 64-bit range (they exceed 2**63).
    return seed if seed is not None else random.getrandbits(64)


def _images_body(files: list[OutputFile]) -> list[dict[str, Any]]:
    return [
        {"url": f.url, "width": f.width, "height": f.height, "content_type": f.content_type}
        for f in files
    ]


class TextToImage(Endpoint):
    def __init__(self, input_model: type[_Input], format_field: str = "output_format") -> None:
        super().__init__(input_model)
        self.format_field = format_field

    async def plan(self, args: Any, load_image: ImageLoader) -> Plan:
        size = _size(args.image_size)
        return Plan(
            sizes=[size] * args.num_images,
            image_format=getattr(args, self.format_field),
            seed=_seed_or_random(args.seed),
            prompt=args.prompt,
            sync_mode=args.sync_mode,
        )

    def respond(self, plan: Plan, files: list[OutputFile], inference_s: float) -> dict[str, Any]:
        return {
            "images": _images_body(files),
            "timings": {"inference": inference_s},
            "seed": plan.seed,
            "has_nsfw_concepts": [False] * len(files),
            "prompt": plan.prompt,
        }


class ImageToImage(TextToImage):
    """``size_from_input``: flux's image-to-image has no ``image_size``; it keeps the input's."""

    def __init__(
        self, input_model: type[_Input], format_field: str, *, size_from_input: bool
    ) -> None:
        super().__init__(input_model, format_field)
        self.size_from_input = size_from_input

    async def plan(self, args: Any, load_image: ImageLoader) -> Plan:
        source = await load_image(args.image_url)
        if self.size_from_input:
            size = (source.width, source.height)
        else:
            size = _size(args.image_size)
        return Plan(
            sizes=[size] * args.num_images,
            image_format=getattr(args, self.format_field),
            seed=_seed_or_random(args.seed),
            prompt=args.prompt,
            sync_mode=args.sync_mode,
        )


class Upscale(Endpoint):
    """Output is the input's size times the factor, as a single ``image``."""

    def __init__(
        self,
        input_model: type[_Input],
        factor_field: str,
        *,
        with_dimensions: bool,
        with_seed: bool,
    ) -> None:
        super().__init__(input_model)
        self.factor_field = factor_field
        self.with_dimensions = with_dimensions
        self.with_seed = with_seed

    async def plan(self, args: Any, load_image: ImageLoader) -> Plan:
        source = await load_image(args.image_url)
        factor = float(getattr(args, self.factor_field))
        size = (round(source.width * factor), round(source.height * factor))
        seed_arg: int | None = getattr(args, "seed", None)
        # The same input upscales to the same output unless a seed says otherwise.
        digest = int.from_bytes(hashlib.sha256(source.data).digest()[:8], "big")
        return Plan(
            sizes=[size],
            image_format=getattr(args, "output_format", "png"),
            seed=seed_arg if seed_arg is not None else digest,
            prompt=getattr(args, "prompt", ""),
        )

    def respond(self, plan: Plan, files: list[OutputFile], inference_s: float) -> dict[str, Any]:
        file = files[0]
        image: dict[str, Any] = {
            "url": file.url,
            "content_type": file.content_type,
            "file_name": file.file_name,
            "file_size": file.file_size,
        }
        if self.with_dimensions:
            image["width"] = file.width
            image["height"] = file.height
        body: dict[str, Any] = {"image": image}
        if self.with_seed:
            body["seed"] = plan.seed
            body["timings"] = {"inference": inference_s}
        return body


ENDPOINTS: dict[str, Endpoint] = {
    "fal-ai/flux/dev": TextToImage(FluxDevInput),
    "fal-ai/flux/schnell": TextToImage(FluxSchnellInput),
    "fal-ai/flux-pro/v1.1": TextToImage(FluxProInput),
    "fal-ai/fast-sdxl": TextToImage(FastSdxlInput, format_field="format"),
    "fal-ai/flux/dev/image-to-image": ImageToImage(
        FluxImageToImageInput, "output_format", size_from_input=True
    ),
    "fal-ai/fast-sdxl/image-to-image": ImageToImage(
        FastSdxlImageToImageInput, "format", size_from_input=False
    ),
    "fal-ai/topaz/upscale/image": Upscale(
        TopazUpscaleInput, "upscale_factor", with_dimensions=False, with_seed=False
    ),
    "fal-ai/esrgan": Upscale(EsrganInput, "scale", with_dimensions=True, with_seed=False),
    "fal-ai/clarity-upscaler": Upscale(
        ClarityUpscalerInput, "upscale_factor", with_dimensions=True, with_seed=True
    ),
}
