"""Input image URLs cannot reach into private networks (SPEC section 3, input images)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from app.errors import InvalidRequest
from app.images import load_input_image
from app.sandbox import serve_app
from app.settings import Settings
from tests.images.conftest import PNG, Origin, origin_app


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, image_fetch_timeout_s=2, **overrides)


def resolver_for(table: dict[str, Sequence[str]], calls: list[str] | None = None) -> Any:
    """Plays DNS: ``table`` maps names to the addresses they 'resolve' to."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


async def _refused(url: str, config: Settings, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await load_input_image(url, config, **kwargs)
    assert caught.value.param == "image_url"
    return caught.value


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/img/png",
        "http://localhost:{port}/img/png",
        "http://[::1]:{port}/img/png",
        "http://[::ffff:127.0.0.1]:{port}/img/png",
        "http://2130706433:{port}/img/png",  # 127.0.0.1 as one decimal number
        "http://0.0.0.0:{port}/img/png",
        "http://10.0.0.7/img/png",
        "http://172.16.5.4/img/png",
        "http://192.168.1.1/img/png",
        "http://100.64.0.1/img/png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/img/png",
        "http://[fd00::1]/img/png",
        "http://224.0.0.1/img/png",
        "http://240.0.0.1/img/png",
    ],
)
async def test_private_and_special_addresses_are_refused(origin: Origin, template: str) -> None:
    error = await _refused(template.format(port=origin.port), settings())
    assert "private" in error.message
    assert origin.hits == []  # refused before connecting


async def test_a_name_resolving_to_loopback_is_refused(origin: Origin) -> None:
    resolver = resolver_for({"evil.example": ["127.0.0.1"]})
    url = f"http://evil.example:{origin.port}/img/png"
    await _refused(url, settings(), resolver=resolver)
    assert origin.hits == []


async def test_one_private_answer_among_public_ones_is_refused(origin: Origin) -> None:
    resolver = resolver_for({"evil.example": ["93.184.216.34", "127.0.0.1"]})
    await _refused(f"http://evil.example:{origin.port}/img/png", settings(), resolver=resolver)


async def test_unresolvable_host(origin: Origin) -> None:
    error = await _refused("http://nowhere.example/x.png", settings(), resolver=resolver_for({}))
    assert "resolve" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/x.png",
        "http:///x.png",
        "not a url",
        "http://user:pass@example.com/x.png",
    ],
)
async def test_only_plain_http_urls(url: str) -> None:
    await _refused(url, settings(), resolver=resolver_for({}))


@pytest.mark.parametrize("entry", ["127.0.0.1:{port}", "127.0.0.1"])
async def test_allow_listed_hosts_may_be_private(origin: Origin, entry: str) -> None:
    config = settings(image_fetch_allow_hosts=[entry.format(port=origin.port)])
    image = await load_input_image(f"{origin.url}/img/png", config)
    assert image.data == PNG
    assert origin.hits == ["/img/png"]


async def test_allow_list_entry_for_another_port_does_not_match(origin: Origin) -> None:
    config = settings(image_fetch_allow_hosts=[f"127.0.0.1:{origin.port + 1}"])
    await _refused(f"{origin.url}/img/png", config)


async def test_allow_list_from_the_environment(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FALGATE_IMAGE_FETCH_ALLOW_HOSTS", f" Example.org , 127.0.0.1:{origin.port}")
    config = Settings(_env_file=None)
    assert config.image_fetch_allow_hosts == ["example.org", f"127.0.0.1:{origin.port}"]
    assert (await load_input_image(f"{origin.url}/img/png", config)).data == PNG


async def test_connection_goes_to_the_resolved_address_with_the_original_host(
    origin: Origin,
) -> None:
    calls: list[str] = []
    resolver = resolver_for({"evil.example": ["127.0.0.1"]}, calls)
    config = settings(image_fetch_allow_hosts=["evil.example"])
    image = await load_input_image(
        f"http://evil.example:{origin.port}/img/png", config, resolver=resolver
    )
    assert image.data == PNG
    assert calls == ["evil.example"]  # resolved once
    assert origin.hosts == [f"evil.example:{origin.port}"]


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/img/png",
        "http://localhost:{port}/img/png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/img/png",
    ],
)
async def test_redirects_are_rechecked(origin: Origin, target: str) -> None:
    config = settings(image_fetch_allow_hosts=[f"127.0.0.1:{origin.port}"])
    to = target.format(port=origin.port)
    await _refused(f"{origin.url}/redirect?to={to}", config)
    assert origin.hits == ["/redirect"]


async def test_redirect_to_an_allowed_place_is_followed(origin: Origin) -> None:
    config = settings(image_fetch_allow_hosts=[f"127.0.0.1:{origin.port}"])
    image = await load_input_image(f"{origin.url}/redirect?to=/img/png", config)
    assert image.data == PNG


async def test_at_most_three_redirects(origin: Origin) -> None:
    config = settings(image_fetch_allow_hosts=[f"127.0.0.1:{origin.port}"])
    assert (await load_input_image(f"{origin.url}/chain/3", config)).data == PNG
    error = await _refused(f"{origin.url}/chain/4", config)
    assert "redirect" in error.message


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tls-origin")
    ca = trustme.CA()
    files = {"ca": tmp / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name in ("evil.example", "other.example"):
        cert = ca.issue_cert(name)
        files[f"{name}.key"] = tmp / f"{name}.key"
        files[f"{name}.crt"] = tmp / f"{name}.crt"
        cert.private_key_pem.write_to_path(str(files[f"{name}.key"]))
        files[f"{name}.crt"].write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return files


@pytest.mark.parametrize(("cert_for", "ok"), [("evil.example", True), ("other.example", False)])
async def test_https_keeps_sni_and_certificate_checks_for_the_name(
    tls_files: dict[str, Path], cert_for: str, ok: bool
) -> None:
    """Connected by address, TLS still verifies the certificate against the URL's host."""
    origin = Origin(url="", port=0)
    app = origin_app(origin)
    async with serve_app(
        app,
        ssl_certfile=str(tls_files[f"{cert_for}.crt"]),
        ssl_keyfile=str(tls_files[f"{cert_for}.key"]),
    ) as url:
        port = int(url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=str(tls_files["ca"]))
        config = settings(image_fetch_allow_hosts=["evil.example"])
        resolver = resolver_for({"evil.example": ["127.0.0.1"]})
        async with httpx.AsyncClient(verify=context, trust_env=False) as client:
            fetch = load_input_image(
                f"https://evil.example:{port}/img/png", config, client=client, resolver=resolver
            )
            if ok:
                assert (await fetch).data == PNG
                assert origin.hosts == [f"evil.example:{port}"]
            else:
                with pytest.raises(InvalidRequest):
                    await fetch
                assert origin.hits == []
