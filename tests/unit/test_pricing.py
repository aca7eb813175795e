"""Pricing is pure: every preset, model, image count, transform and upscale, exactly."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from app.catalog import IMAGE_SIZE_PRESETS, load_catalog, price_images, price_pixels
from app.money import display_price, format_usd, parse_usd

# USD per megapixel as the SPEC states them, written independently of the catalog file.
SPEC_PRICES = {
    "fal-ai/flux/dev": "0.015",
    "fal-ai/flux/schnell": "0.004",
    "fal-ai/flux-pro": "0.04",
    "fal-ai/stable-diffusion-xl": "0.007",
}
TRANSFORM, UPSCALE = "0.045", "0.03"
SPEC_PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


def expected_micro(pixels: int, usd_per_mp: str) -> int:
    """ceil(megapixels x price) in micro-dollars, computed with exact fractions."""
    usd = Fraction(pixels, 1_000_000) * Fraction(usd_per_mp)
    return math.ceil(usd * 1_000_000)


def test_spec_example() -> None:
    price = price_pixels(1024 * 768, load_catalog().model("flux-dev").unit_price)
    assert format_usd(price.amount) == "0.011797"
    assert display_price(price.amount) == "$0.012"
    assert str(price.megapixels) == "0.786432"


def test_presets_match_spec() -> None:
    assert IMAGE_SIZE_PRESETS == SPEC_PRESETS


def test_catalog_prices_match_spec() -> None:
    catalog = load_catalog()
    for model_id, usd in SPEC_PRICES.items():
        assert catalog.model(model_id).unit_price == parse_usd(usd)
    assert catalog.transform_unit_price == parse_usd(TRANSFORM)
    assert catalog.upscale_unit_price == parse_usd(UPSCALE)


@pytest.mark.parametrize("model_id", sorted(SPEC_PRICES))
@pytest.mark.parametrize("preset", sorted(SPEC_PRESETS))
@pytest.mark.parametrize("num_images", [1, 2, 3, 4])
def test_generate_price_table(model_id: str, preset: str, num_images: int) -> None:
    width, height = SPEC_PRESETS[preset]
    unit = load_catalog().model(model_id).unit_price
    price = price_images([(width, height)] * num_images, unit)
    assert price.amount == expected_micro(width * height * num_images, SPEC_PRICES[model_id])
    assert price.pixels == width * height * num_images


@pytest.mark.parametrize("preset", sorted(SPEC_PRESETS))
@pytest.mark.parametrize("num_images", [1, 2, 3, 4])
def test_transform_price_table(preset: str, num_images: int) -> None:
    width, height = SPEC_PRESETS[preset]
    price = price_images([(width, height)] * num_images, load_catalog().transform_unit_price)
    assert price.amount == expected_micro(width * height * num_images, TRANSFORM)


@pytest.mark.parametrize("upscaler", ["topaz", "esrgan", "clarity"])
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("size", [(64, 64), (333, 257), (1024, 768), (1999, 1001)])
def test_upscale_price_table(upscaler: str, scale: int, size: tuple[int, int]) -> None:
    catalog = load_catalog()
    catalog.upscaler(upscaler)
    out = (size[0] * scale, size[1] * scale)
    price = price_images([out], catalog.upscale_unit_price)
    assert price.amount == expected_micro(out[0] * out[1], UPSCALE)


@pytest.mark.parametrize(
    ("pixels", "unit", "amount"),
    [
        (0, 15_000, 0),
        (1, 15_000, 1),  # 0.015 micro-dollars rounds up to one
        (66_666, 15_000, 1000),  # 999.99 -> 1000
        (66_667, 15_000, 1001),  # 1000.005 -> 1001
        (1_000_000, 15_000, 15_000),  # exact, no rounding
        (4096 * 4096, 45_000, 754_975),
    ],
)
def test_rounds_up_once_per_request(pixels: int, unit: int, amount: int) -> None:
    assert price_pixels(pixels, unit).amount == amount


def test_rounding_happens_once_not_per_image() -> None:
    # Three images of 1 pixel at 0.4 micro-dollars each: 1.2 -> 2, not 3 x 1.
    assert price_images([(1, 1)] * 3, 400_000).amount == 2


@pytest.mark.parametrize(
    ("micro", "shown"),
    [(0, "$0.000"), (1, "$0.001"), (499, "$0.001"), (500, "$0.001"), (1500, "$0.002"),
     (11_797, "$0.012"), (12_500, "$0.013"), (1_234_567, "$1.235")],
)  # fmt: skip
def test_display_price_half_up(micro: int, shown: str) -> None:
    assert display_price(micro) == shown


@pytest.mark.parametrize(
    ("text", "micro"), [("0.015", 15_000), ("50", 50_000_000), ("0.000001", 1), ("1e-6", 1)]
)
def test_parse_usd(text: str, micro: int) -> None:
    assert parse_usd(text) == micro


@pytest.mark.parametrize("text", ["0.0000001", "abc", "NaN", "Infinity"])
def test_parse_usd_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_usd(text)


def test_format_usd() -> None:
    assert format_usd(0) == "0.000000"
    assert format_usd(11_797) == "0.011797"
    assert format_usd(50_000_000) == "50.000000"
