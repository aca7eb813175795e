"""Pure pricing: megapixels times the unit price, rounded up once per request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

PIXELS_PER_MEGAPIXEL = 1_000_000

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


@dataclass(frozen=True)
class Price:
    """An exact price: ``amount`` micro-dollars for ``pixels`` output pixels."""

    amount: int
    pixels: int
    unit_price: int  # micro-dollars per megapixel

    @property
    def megapixels(self) -> Decimal:
        return Decimal(self.pixels) / PIXELS_PER_MEGAPIXEL


def price_pixels(pixels: int, unit_price: int) -> Price:
    """``ceil(pixels * unit_price / 10^6)`` micro-dollars, in integers only."""
    if pixels < 0 or unit_price < 0:
        raise ValueError("pixels and unit price must not be negative")
    amount = -(-pixels * unit_price // PIXELS_PER_MEGAPIXEL)
    return Price(amount=amount, pixels=pixels, unit_price=unit_price)


def price_images(sizes: Iterable[tuple[int, int]], unit_price: int) -> Price:
    """Price a set of output images given as ``(width, height)`` pairs."""
    return price_pixels(sum(w * h for w, h in sizes), unit_price)
