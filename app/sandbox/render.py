"""Real, deterministic pictures for the sandbox, and the bounded store that serves them."""

from __future__ import annotations

import hashlib
import io
import random
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}
# Art is drawn on a small canvas and scaled up: cheap at any output size.
_CANVAS_SIDE = 96


def render_image(
    *, seed: int, prompt: str, index: int, width: int, height: int, image_format: str
) -> bytes:
    """A ``width``x``height`` JPEG or PNG that depends only on its arguments.

    CPU-bound (encoding dominates): call it through ``asyncio.to_thread``.
    """
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{index}".encode()).digest()
    rng = random.Random(digest)
    scale = _CANVAS_SIDE / max(width, height)
    canvas_size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    gradient = Image.linear_gradient("L").rotate(rng.randrange(360)).resize(canvas_size)
    canvas = ImageOps.colorize(gradient, colour(), colour())
    draw = ImageDraw.Draw(canvas)
    cw, ch = canvas_size
    for _ in range(rng.randrange(3, 8)):
        x0, y0 = rng.randrange(cw), rng.randrange(ch)
        x1, y1 = x0 + rng.randrange(1, cw + 1), y0 + rng.randrange(1, ch + 1)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour())
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour())
    picture = canvas.resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    if image_format == "png":
        picture.save(out, format="PNG", compress_level=1)
    else:
        picture.save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    content_type: str


class FileStore:
    """Generated files in memory, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._size = 0

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self._drop(name)
        self._files[name] = StoredFile(data, content_type)
        self._size += len(data)
        while self._size > self.max_bytes and self._files:
            oldest = next(iter(self._files))
            self._drop(oldest)

    def get(self, name: str) -> StoredFile | None:
        stored = self._files.get(name)
        if stored is not None:
            self._files.move_to_end(name)
        return stored

    def clear(self) -> None:
        self._files.clear()
        self._size = 0

    def _drop(self, name: str) -> None:
        stored = self._files.pop(name, None)
        if stored is not None:
            self._size -= len(stored.data)
