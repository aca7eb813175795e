"""Models, their upstream endpoints and adapters, and pricing."""

from app.catalog.catalog import Catalog, CatalogError, ModelEntry, UpscalerEntry, load_catalog
from app.catalog.pricing import IMAGE_SIZE_PRESETS, Price, price_images, price_pixels

__all__ = [
    "IMAGE_SIZE_PRESETS",
    "Catalog",
    "CatalogError",
    "ModelEntry",
    "Price",
    "UpscalerEntry",
    "load_catalog",
    "price_images",
    "price_pixels",
]
