"""Catalog-driven adapters: a validated request becomes the exact JSON a fal endpoint takes.

Parameters an endpoint does not take are left out (the catalog lists what each takes), and
endpoints that name a parameter differently (fast-sdxl's ``format``, esrgan's ``scale``) get
their own name.
"""

from __future__ import annotations

from typing import Any

from app.catalog.catalog import ModelEntry, UpscalerEntry
from app.upstream.types import UpstreamCall


def _image_size_json(image_size: str | tuple[int, int]) -> Any:
    if isinstance(image_size, tuple):
        return {"width": image_size[0], "height": image_size[1]}
    return image_size


def _common(taken: frozenset[str], format_param: str, values: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name, value in values.items():
        if value is None or name not in taken:
            continue
        args[format_param if name == "output_format" else name] = value
    return args


def text_to_image_call(
    model: ModelEntry,
    *,
    prompt: str,
    image_size: str | tuple[int, int],
    num_images: int,
    num_inference_steps: int,
    guidance_scale: float,
    output_format: str,
    seed: int | None,
) -> UpstreamCall:
    args = {"prompt": prompt}
    args.update(
        _common(
            model.params,
            model.format_param,
            {
                "image_size": _image_size_json(image_size),
                "num_images": num_images,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "output_format": output_format,
                "seed": seed,
            },
        )
    )
    return UpstreamCall(endpoint=model.text_to_image, arguments=args)


def image_to_image_call(
    model: ModelEntry,
    *,
    image_url: str,
    prompt: str,
    image_size: tuple[int, int],
    strength: float,
    num_images: int,
    num_inference_steps: int,
    output_format: str,
    seed: int | None,
) -> UpstreamCall:
    """The input image has already been fitted to ``image_size``, so endpoints without an
    ``image_size`` parameter (flux dev's image-to-image) still return that size."""
    assert model.image_to_image is not None
    args: dict[str, Any] = {"image_url": image_url, "prompt": prompt}
    args.update(
        _common(
            model.image_to_image_params,
            model.format_param,
            {
                "image_size": _image_size_json(image_size),
                "strength": strength,
                "num_images": num_images,
                "num_inference_steps": num_inference_steps,
                "output_format": output_format,
                "seed": seed,
            },
        )
    )
    return UpstreamCall(endpoint=model.image_to_image, arguments=args)


def upscale_call(
    upscaler: UpscalerEntry, *, image_url: str, scale: int, output_format: str
) -> UpstreamCall:
    args: dict[str, Any] = {"image_url": image_url, upscaler.factor_param: scale}
    if "output_format" in upscaler.params:
        args["output_format"] = output_format
    return UpstreamCall(endpoint=upscaler.endpoint, arguments=args)
