"""The catalog: aliases, adapters and the operator's TOML override."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog import CatalogError, load_catalog
from app.catalog.adapters import image_to_image_call, text_to_image_call, upscale_call
from app.errors import InvalidRequest, ModelNotFound


def test_aliases_resolve_to_ids() -> None:
    catalog = load_catalog()
    assert catalog.model("flux-dev").id == "fal-ai/flux/dev"
    assert catalog.model("sdxl").text_to_image == "fal-ai/fast-sdxl"
    assert catalog.model("flux-pro").text_to_image == "fal-ai/flux-pro/v1.1"
    with pytest.raises(ModelNotFound):
        catalog.model("no/such-model")
    with pytest.raises(InvalidRequest):
        catalog.transform_model("flux-schnell")


def _t2i(model_name: str) -> dict[str, object]:
    model = load_catalog().model(model_name)
    return text_to_image_call(
        model,
        prompt="p",
        image_size="square",
        num_images=2,
        num_inference_steps=model.default_steps,
        guidance_scale=3.5,
        output_format="png",
        seed=2**64 - 1,
    ).arguments


def test_sdxl_gets_format_not_output_format() -> None:
    args = _t2i("sdxl")
    assert args["format"] == "png"
    assert "output_format" not in args


def test_flux_pro_gets_no_steps_or_guidance() -> None:
    args = _t2i("flux-pro")
    assert "num_inference_steps" not in args and "guidance_scale" not in args
    assert args["seed"] == 2**64 - 1 and args["output_format"] == "png"


def test_schnell_default_steps_within_its_limit() -> None:
    model = load_catalog().model("flux-schnell")
    assert model.max_steps == 12 and _t2i("flux-schnell")["num_inference_steps"] == 4


def test_flux_image_to_image_has_no_image_size() -> None:
    model = load_catalog().model("flux-dev")
    args = image_to_image_call(
        model,
        image_url="data:image/png;base64,AA==",
        prompt="p",
        image_size=(512, 512),
        strength=0.5,
        num_images=1,
        num_inference_steps=28,
        output_format="jpeg",
        seed=None,
    ).arguments
    assert "image_size" not in args and "seed" not in args
    assert args["strength"] == 0.5


def test_upscaler_factor_names() -> None:
    catalog = load_catalog()
    assert upscale_call(catalog.upscaler("topaz"), image_url="u", scale=4, output_format="png")\
        .arguments == {"image_url": "u", "upscale_factor": 4, "output_format": "png"}  # fmt: skip
    assert upscale_call(catalog.upscaler("esrgan"), image_url="u", scale=2, output_format="png")\
        .arguments["scale"] == 2  # fmt: skip
    assert (
        "output_format"
        not in upscale_call(
            catalog.upscaler("clarity"), image_url="u", scale=2, output_format="png"
        ).arguments
    )


def test_operator_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        """
[operations]
upscale_usd_per_mp = "0.05"

[[models]]
id = "fal-ai/flux/dev"
alias = "flux-dev"
text_to_image = "fal-ai/flux/dev"
usd_per_mp = "0.02"

[[models]]
id = "fal-ai/recraft-v3"
alias = "recraft"
text_to_image = "fal-ai/recraft-v3"
usd_per_mp = "0.04"
params = ["image_size", "num_images", "seed"]
"""
    )
    catalog = load_catalog(path)
    assert catalog.model("flux-dev").unit_price == 20_000
    assert catalog.model("flux-dev").image_to_image is None
    assert catalog.model("recraft").text_to_image == "fal-ai/recraft-v3"
    assert catalog.upscale_unit_price == 50_000
    assert catalog.transform_unit_price == 45_000
    assert catalog.model("sdxl").unit_price == 7_000


@pytest.mark.parametrize(
    "body",
    [
        '[[models]]\nid = "x"\ntext_to_image = "x"\nusd_per_mp = "0.0000001"\n',
        '[[models]]\nid = "x"\ntext_to_image = "x"\n',
        '[[models]]\nid = "x"\ntext_to_image = "x"\nusd_per_mp = "1"\nparams = ["bogus"]\n',
        "not toml [",
    ],
)
def test_bad_catalog_files_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(body)
    with pytest.raises(CatalogError):
        load_catalog(path)


def test_fal_endpoint_ids_map_to_their_catalog_entries() -> None:
    endpoints = load_catalog().fal_endpoints
    assert {
        "fal-ai/flux/dev",
        "fal-ai/flux/dev/image-to-image",
        "fal-ai/flux/schnell",
        "fal-ai/flux-pro/v1.1",
        "fal-ai/fast-sdxl",
        "fal-ai/fast-sdxl/image-to-image",
        "fal-ai/topaz/upscale/image",
        "fal-ai/esrgan",
        "fal-ai/clarity-upscaler",
    } <= set(endpoints)
    sdxl = endpoints["fal-ai/fast-sdxl"]
    assert sdxl.kind == "text_to_image" and sdxl.model is not None
    assert (
        sdxl.model.id == "fal-ai/stable-diffusion-xl" and sdxl.model.fal_image_size == "square_hd"
    )
    assert {"format", "sync_mode", "negative_prompt"} <= sdxl.fields
    assert "output_format" not in sdxl.fields
    i2i = endpoints["fal-ai/flux/dev/image-to-image"]
    assert i2i.kind == "image_to_image" and "image_size" not in i2i.fields
    esrgan = endpoints["fal-ai/esrgan"]
    assert esrgan.kind == "upscale" and esrgan.upscaler is not None and "scale" in esrgan.fields
    with pytest.raises(ModelNotFound):
        load_catalog().fal_endpoint("fal-ai/flux")  # a catalog id, not a fal endpoint id


def test_operator_models_are_served_on_fals_api(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(
        '[[models]]\nid = "fal-ai/flux-krea"\ntext_to_image = "fal-ai/flux/krea"\n'
        'usd_per_mp = "0.02"\nparams = ["image_size", "num_images", "seed"]\n'
    )
    endpoint = load_catalog(override).fal_endpoint("fal-ai/flux/krea")
    assert endpoint.model is not None and endpoint.model.unit_price == 20_000
    # Without `fal_fields`: the priced params, the prompt and the common switches.
    assert endpoint.fields == {
        "prompt", "image_size", "num_images", "seed", "sync_mode", "enable_safety_checker"
    }  # fmt: skip
