"""Real, deterministic pictures for the sandbox, and the bounded store that serves them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}
_TYPE_BY_EXTENSION = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in CONTENT_TYPES}
_FILE_NAME = re.compile(r"[0-9a-f]{32}\.(?:jpg|png)")  # what Sandbox._store names files
# Art is drawn on a small canvas and scaled up: cheap at any output size.
_CANVAS_SIDE = 96
#: Pictures up to this size are remembered (``render_small``) and drawn on the event loop.
SMALL_PICTURE_PIXELS = 256 * 256


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


@functools.lru_cache(maxsize=64)
def render_small(
    *, seed: int, prompt: str, index: int, width: int, height: int, image_format: str
) -> bytes:
    """:func:`render_image` for pictures of at most ``SMALL_PICTURE_PIXELS``, remembered.

    The same arguments always give the same bytes, so a repeated small request (a benchmark's,
    a test's) is not drawn again: the sandbox stands in for a remote service whose CPU is not
    the gateway's, and on a shared machine its drawing would otherwise be measured as theirs.
    At most 64 pictures of at most ~200 KB each are kept.
    """
    if width * height > SMALL_PICTURE_PIXELS:
        raise ValueError(f"{width}x{height} is not a small picture")
    return render_image(
        seed=seed, prompt=prompt, index=index, width=width, height=height, image_format=image_format
    )


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    content_type: str


class FileStore:
    """Generated files, least recently used evicted past ``max_bytes``.

    In memory by default; with ``directory`` (the embedded sandbox uses the gateway's data
    dir) every file is written there (mode 600) and served from there, so the image URLs a
    gateway handed out keep working after a restart.
    """

    def __init__(self, max_bytes: int, directory: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._on_disk: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        self._size = 0
        if directory is not None:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            found = [f for f in directory.iterdir() if _FILE_NAME.fullmatch(f.name)]
            for path in sorted(found, key=lambda f: f.stat().st_mtime):
                size = path.stat().st_size
                self._on_disk[path.name] = size
                self._size += size

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self._drop(name)
        if self.directory is not None:
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self._on_disk[name] = len(data)
        else:
            self._files[name] = StoredFile(data, content_type)
        self._size += len(data)
        while self._size > self.max_bytes and (self._files or self._on_disk):
            oldest = next(iter(self._files or self._on_disk))
            self._drop(oldest)

    def get(self, name: str) -> StoredFile | None:
        if self.directory is not None:
            if name not in self._on_disk:
                return None
            try:
                data = (self.directory / name).read_bytes()
            except OSError:
                return None
            self._on_disk.move_to_end(name)
            extension = name.rsplit(".", 1)[-1]
            return StoredFile(data, _TYPE_BY_EXTENSION.get(extension, "application/octet-stream"))
        stored = self._files.get(name)
        if stored is not None:
            self._files.move_to_end(name)
        return stored

    def clear(self) -> None:
        for name in list(self._on_disk):
            self._drop(name)
        self._files.clear()
        self._size = 0

    def _drop(self, name: str) -> None:
        stored = self._files.pop(name, None)
        if stored is not None:
            self._size -= len(stored.data)
        size = self._on_disk.pop(name, None)
        if size is not None and self.directory is not None:
            self._size -= size
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()
