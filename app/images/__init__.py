"""Input images for transform and upscale: fetched safely, measured, and forwarded as bytes."""

from app.images.fetch import (
    MAX_REDIRECTS,
    Resolver,
    is_public_address,
    load_input_image,
    resolve_host,
)
from app.images.image import InputImage, fit_to_size, probe_image, to_data_uri

__all__ = [
    "MAX_REDIRECTS",
    "InputImage",
    "Resolver",
    "fit_to_size",
    "is_public_address",
    "load_input_image",
    "probe_image",
    "resolve_host",
    "to_data_uri",
]
