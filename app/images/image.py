"""Input images as measured bytes: probing a header safely, fitting, and data: URIs."""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidRequest, PayloadTooLarge

# Pillow format name -> the content type we forward. Anything else is refused.
_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_FORMATS = {content_type: fmt for fmt, content_type in _CONTENT_TYPES.items()}


@dataclass(frozen=True)
class InputImage:
    """An image exactly as the gateway measured it; these bytes are what gets forwarded."""

    data: bytes
    width: int
    height: int
    content_type: str  # image/jpeg | image/png | image/webp

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_image(data: bytes, *, max_pixels: int, param: str = "image_url") -> InputImage:
    """Identify ``data`` as JPEG, PNG or WebP from its bytes and read its size from the header.

    Pixel data is never decoded, so a decompression bomb (a small file declaring huge
    dimensions) costs nothing; it and any image over ``max_pixels`` raise ``PayloadTooLarge``.
    Anything that is not one of the three formats raises ``InvalidRequest``.
    """
    try:
        # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; a warning
        # would let the image through, so promote it. No await happens inside this block.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(_CONTENT_TYPES)) as img:
                width, height = img.size
                fmt = img.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge("The input image declares too many pixels.", param=param) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(
            f"'{param}' must point to a JPEG, PNG or WebP image.", param=param
        ) from exc
    content_type = _CONTENT_TYPES.get(fmt or "")
    if content_type is None or width <= 0 or height <= 0:
        raise InvalidRequest(f"'{param}' must point to a JPEG, PNG or WebP image.", param=param)
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"The input image is {width}x{height} pixels; at most "
            f"{max_pixels / 1_000_000:g} megapixels are accepted.",
            param=param,
        )
    return InputImage(data=data, width=width, height=height, content_type=content_type)


def fit_to_size(image: InputImage, width: int, height: int) -> InputImage:
    """Centre-crop ``image`` to the aspect ratio of ``width``x``height``, then resize to it.

    The result is re-encoded in the image's own format. CPU-bound: call it through
    ``asyncio.to_thread`` from async code.
    """
    fmt = _FORMATS[image.content_type]
    with Image.open(io.BytesIO(image.data), formats=[fmt]) as src:
        orientation = src.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation == 1 and src.size == (width, height):
            return image
        # Re-encoding drops EXIF, so bake the camera orientation into the pixels first.
        upright = ImageOps.exif_transpose(src)
        fitted = ImageOps.fit(upright, (width, height), method=Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "PNG":
        fitted.save(out, format=fmt)
    else:
        fitted.save(out, format=fmt, quality=95)
    return InputImage(
        data=out.getvalue(), width=width, height=height, content_type=image.content_type
    )


def to_data_uri(image: InputImage) -> str:
    """The image as a ``data:`` URI, the form in which its exact bytes are sent to fal."""
    encoded = base64.b64encode(image.data).decode("ascii")
    return f"data:{image.content_type};base64,{encoded}"
