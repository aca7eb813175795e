"""The sandbox's images are real files of exactly the requested size and format."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.sandbox import SandboxConfig, SandboxControl, create_sandbox_app, serve_app
from app.sandbox.render import render_image, render_small
from tests.conftest import _stop, start_sandbox


async def _image(fal: httpx.AsyncClient, url: str) -> Image.Image:
    response = await fal.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def _png_data_uri(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize(
    ("endpoint", "args", "size", "fmt"),
    [
        ("fal-ai/flux/dev", {"image_size": "portrait_16_9"}, (576, 1024), "JPEG"),
        ("fal-ai/flux/dev", {"image_size": {"width": 333, "height": 97}}, (333, 97), "JPEG"),
        ("fal-ai/flux/schnell", {"output_format": "png"}, (1024, 768), "PNG"),
        ("fal-ai/flux-pro/v1.1", {"image_size": "square"}, (512, 512), "JPEG"),
        ("fal-ai/fast-sdxl", {"format": "png"}, (1024, 1024), "PNG"),
        # fast-sdxl takes 'format': 'output_format' is an unknown field there, ignored.
        ("fal-ai/fast-sdxl", {"output_format": "png", "image_size": "square"}, (512, 512), "JPEG"),
    ],
)
async def test_text_to_image_sizes_and_formats(
    fal: httpx.AsyncClient,
    endpoint: str,
    args: dict[str, Any],
    size: tuple[int, int],
    fmt: str,
) -> None:
    body = (await fal.post(f"/{endpoint}", json={"prompt": "a fox", **args})).json()
    [meta] = body["images"]
    image = await _image(fal, meta["url"])
    assert image.size == size == (meta["width"], meta["height"])
    assert image.format == fmt
    assert meta["content_type"] == f"image/{fmt.lower()}"
    assert body["has_nsfw_concepts"] == [False]


async def test_num_images(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    body = (
        await fal.post("/fal-ai/flux/dev", json={"prompt": "x", "num_images": 3, "seed": 7})
    ).json()
    urls = [i["url"] for i in body["images"]]
    assert len(set(urls)) == 3
    contents = {(await fal.get(u)).content for u in urls}
    assert len(contents) == 3  # three different pictures, not one copy
    [entry] = await control.requests()
    assert entry["pixels"] == 3 * 1024 * 768
    assert [(i["width"], i["height"]) for i in entry["images"]] == [(1024, 768)] * 3


async def test_images_are_deterministic_from_seed_and_prompt(fal: httpx.AsyncClient) -> None:
    async def picture(**args: Any) -> bytes:
        body = {"prompt": "a fox", "seed": 42, "image_size": "square", **args}
        url = (await fal.post("/fal-ai/flux/dev", json=body)).json()["images"][0]["url"]
        return (await fal.get(url)).content

    first = await picture()
    assert await picture() == first
    assert await picture(seed=43) != first
    assert await picture(prompt="a wolf") != first


async def test_sync_mode_inlines_the_image(fal: httpx.AsyncClient) -> None:
    body = (
        await fal.post(
            "/fal-ai/flux/dev", json={"prompt": "x", "image_size": "square", "sync_mode": True}
        )
    ).json()
    url = body["images"][0]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)


async def test_flux_image_to_image_keeps_the_input_size(fal: httpx.AsyncClient) -> None:
    body = (
        await fal.post(
            "/fal-ai/flux/dev/image-to-image",
            # image_size is not a field of this endpoint: ignored.
            json={"prompt": "x", "image_url": _png_data_uri(300, 200), "image_size": "square"},
        )
    ).json()
    [meta] = body["images"]
    assert (meta["width"], meta["height"]) == (300, 200)
    assert (await _image(fal, meta["url"])).size == (300, 200)


async def test_sdxl_image_to_image_uses_image_size(fal: httpx.AsyncClient) -> None:
    body = (
        await fal.post(
            "/fal-ai/fast-sdxl/image-to-image",
            json={"prompt": "x", "image_url": _png_data_uri(300, 200), "image_size": "square"},
        )
    ).json()
    assert (await _image(fal, body["images"][0]["url"])).size == (512, 512)


async def test_image_inputs_over_http(fal: httpx.AsyncClient) -> None:
    """An http(s) image_url is downloaded, including the sandbox's own file URLs."""
    generated = (
        await fal.post("/fal-ai/flux/dev", json={"prompt": "x", "image_size": "square"})
    ).json()["images"][0]["url"]
    upscaled = (await fal.post("/fal-ai/esrgan", json={"image_url": generated, "scale": 4})).json()[
        "image"
    ]
    assert (upscaled["width"], upscaled["height"]) == (2048, 2048)

    # A server that is not the sandbox: the fetch really goes over HTTP.
    origin = create_sandbox_app(SandboxConfig(latency_ms=0))
    async with (
        serve_app(origin) as origin_url,
        httpx.AsyncClient(base_url=origin_url, headers={"Authorization": "Key k"}) as other,
    ):
        url = (await other.post("/fal-ai/flux/dev", json={"prompt": "y"})).json()["images"][0][
            "url"
        ]
        body = (
            await fal.post("/fal-ai/clarity-upscaler", json={"image_url": url, "upscale_factor": 2})
        ).json()
    assert (body["image"]["width"], body["image"]["height"]) == (2048, 1536)
    assert isinstance(body["seed"], int)


async def test_topaz_answers_a_file_without_dimensions(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    response = await fal.post(
        "/fal-ai/topaz/upscale/image",
        json={"image_url": _png_data_uri(120, 80), "upscale_factor": 4, "output_format": "png"},
    )
    image = response.json()["image"]
    assert set(image) == {"url", "content_type", "file_name", "file_size"}
    picture = await _image(fal, image["url"])
    assert picture.size == (480, 320) and picture.format == "PNG"
    assert image["file_size"] == len((await fal.get(image["url"])).content)
    [entry] = await control.requests()
    assert entry["images"][0]["width"] == 480 and entry["pixels"] == 480 * 320


@pytest.mark.parametrize(
    ("endpoint", "args"),
    [
        ("fal-ai/topaz/upscale/image", {"upscale_factor": 5}),
        ("fal-ai/esrgan", {"scale": 0}),
        ("fal-ai/clarity-upscaler", {"upscale_factor": 4.5}),
    ],
)
async def test_upscale_factor_ranges(
    fal: httpx.AsyncClient, endpoint: str, args: dict[str, Any]
) -> None:
    response = await fal.post(f"/{endpoint}", json={"image_url": _png_data_uri(8, 8), **args})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "image_url",
    ["data:text/plain;base64,aGVsbG8=", "ftp://example.invalid/x.png", "data:image/png;base64,@@"],
)
async def test_bad_input_images_fail_the_request(
    fal: httpx.AsyncClient, control: SandboxControl, image_url: str
) -> None:
    response = await fal.post("/fal-ai/esrgan", json={"image_url": image_url})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "image_url"]
    assert (await control.requests())[0]["status"] == "failed"


async def test_files_are_evicted_least_recently_used(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(max_file_bytes=60_000)
    urls = []
    for seed in range(4):
        body = {"prompt": "x", "seed": seed, "output_format": "png", "image_size": "square"}
        urls.append((await fal.post("/fal-ai/flux/dev", json=body)).json()["images"][0]["url"])
    assert (await fal.get(urls[0])).status_code == 404
    assert (await fal.get(urls[-1])).status_code == 200
    assert (await fal.get("/files/nope.png")).status_code == 404


def test_small_pictures_are_drawn_once_and_stay_the_same() -> None:
    render_small.cache_clear()

    def small(seed: int = 99, width: int = 64, height: int = 48) -> bytes:
        return render_small(
            seed=seed, prompt="a fox", index=0, width=width, height=height, image_format="png"
        )

    first = small()
    assert small() == first
    assert render_small.cache_info().hits == 1
    drawn = render_image(seed=99, prompt="a fox", index=0, width=64, height=48, image_format="png")
    assert first == drawn
    other = small(seed=100)
    assert other != first
    image = Image.open(io.BytesIO(other))
    assert (image.size, image.format) == ((64, 48), "PNG")
    with pytest.raises(ValueError, match="not a small picture"):
        small(width=257, height=256)


async def test_small_and_large_pictures_through_the_app(fal: httpx.AsyncClient) -> None:
    """Small pictures come from the remembered drawings, large ones are drawn in a thread:
    both are what was asked for, and a repeat of a small one is the same file."""
    render_small.cache_clear()
    small = {"prompt": "a fox", "seed": 5, "image_size": {"width": 256, "height": 256}}
    urls = [(await fal.post("/fal-ai/flux/dev", json=small)).json()["images"][0]["url"]]
    urls.append((await fal.post("/fal-ai/flux/dev", json=small)).json()["images"][0]["url"])
    assert render_small.cache_info().hits == 1
    assert urls[0] != urls[1]
    assert (await fal.get(urls[0])).content == (await fal.get(urls[1])).content
    large = {**small, "image_size": {"width": 257, "height": 256}}
    [meta] = (await fal.post("/fal-ai/flux/dev", json=large)).json()["images"]
    assert (await _image(fal, meta["url"])).size == (257, 256)
    assert render_small.cache_info().currsize == 1


def test_the_standalone_sandbox_can_leave_out_its_access_log(tmp_path: Path) -> None:
    logs = {}
    for name, args in (("default", ()), ("quiet", ("--no-access-log",))):
        box = start_sandbox(tmp_path, *args)
        try:
            answer = httpx.post(
                f"{box.url}/fal-ai/flux/dev",
                json={"prompt": "x"},
                headers={"Authorization": "Key sandbox"},
                timeout=30,
            )
            assert answer.status_code == 200
        finally:
            _stop(box.proc)
        port = box.url.rsplit(":", 1)[1]
        logs[name] = (tmp_path / f"sandbox-{port}.log").read_text()
    assert '"POST /fal-ai/flux/dev HTTP/1.1" 200' in logs["default"]
    assert "POST /fal-ai/flux/dev" not in logs["quiet"]
    assert "Uvicorn running" in logs["quiet"]
