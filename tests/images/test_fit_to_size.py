"""Fitting an input to the requested output size: centre crop, resize, same format."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app.images import InputImage, fit_to_size, probe_image
from tests.images.conftest import encode


def _stripes(width: int, height: int, fmt: str, mode: str = "RGB") -> InputImage:
    """Three vertical bands: red | green | blue."""
    image = Image.new(mode, (width, height))
    third = width // 3
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        band = Image.new(mode, (third, height), colour)
        image.paste(band, (index * third, 0))
    return probe_image(encode(image, fmt), max_pixels=10**8)


def _open(image: InputImage) -> Image.Image:
    opened = Image.open(io.BytesIO(image.data))
    opened.load()
    return opened


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")],
)
@pytest.mark.parametrize("size", [(100, 100), (64, 256), (1024, 768), (3, 2)])
def test_output_has_exactly_the_requested_size_and_same_format(
    fmt: str, content_type: str, size: tuple[int, int]
) -> None:
    fitted = fit_to_size(_stripes(300, 200, fmt), *size)
    opened = _open(fitted)
    assert opened.size == size == (fitted.width, fitted.height)
    assert opened.format == fmt
    assert fitted.content_type == content_type
    assert probe_image(fitted.data, max_pixels=10**8) == fitted


def test_crop_is_centred() -> None:
    # A tall crop of a wide image keeps only the middle (green) band.
    fitted = _open(fit_to_size(_stripes(300, 100, "PNG"), 50, 100))
    colours = {fitted.getpixel((x, y)) for x in range(5, 45) for y in range(0, 100, 10)}
    assert colours == {(0, 255, 0)}


def test_same_size_is_returned_untouched() -> None:
    image = _stripes(90, 60, "JPEG")
    assert fit_to_size(image, 90, 60) is image


def test_transparency_survives() -> None:
    rgba = probe_image(encode(Image.new("RGBA", (40, 40), (0, 0, 255, 0)), "PNG"), max_pixels=10**6)
    fitted = _open(fit_to_size(rgba, 20, 10))
    pixel = fitted.getpixel((5, 5))
    assert fitted.mode == "RGBA" and isinstance(pixel, tuple) and pixel[3] == 0


def test_exif_orientation_is_applied_before_fitting() -> None:
    # Stored 200x100 but tagged "rotate 90": upright it is 100x200, so fitting to 100x200
    # must not crop anything away.
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste(Image.new("RGB", (100, 100), (0, 0, 255)), (100, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    source = probe_image(out.getvalue(), max_pixels=10**6)
    fitted = _open(fit_to_size(source, 100, 200))
    assert fitted.size == (100, 200)
    top, bottom = fitted.getpixel((50, 20)), fitted.getpixel((50, 180))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and bottom[2] > 200  # red above blue: rotated, not cropped
