"""falgate: an exactly metered gateway in front of fal.ai image generation."""

__version__ = "0.1.0"
