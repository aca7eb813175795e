"""``falgate serve`` over TLS: the development CA and certificate, and refused settings."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from app.ops.tls import TlsConfigError, development_certificate, tls_files
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, ROOT
from tests.falapi.conftest import TlsGateway


def test_development_ca_signs_a_localhost_certificate(tmp_path: Path) -> None:
    files = development_certificate(tmp_path / "tls")
    assert files.ca_file == tmp_path / "tls" / "ca.pem"
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    assert files.keyfile.stat().st_mode & 0o077 == 0  # the private key is the owner's only

    again = development_certificate(tmp_path / "tls")  # kept in the data dir, not remade
    assert again.certfile.read_bytes() == files.certfile.read_bytes()


def test_tls_settings(tmp_path: Path) -> None:
    assert tls_files(Settings(data_dir=tmp_path)) is None
    with pytest.raises(TlsConfigError, match="FALGATE_TLS_KEYFILE"):
        tls_files(Settings(data_dir=tmp_path, tls_certfile=tmp_path / "c.pem"))
    with pytest.raises(TlsConfigError, match="no such file"):
        tls_files(
            Settings(data_dir=tmp_path, tls_certfile=tmp_path / "c", tls_keyfile=tmp_path / "k")
        )
    made = development_certificate(tmp_path / "mine")
    given = tls_files(
        Settings(data_dir=tmp_path, tls_certfile=made.certfile, tls_keyfile=made.keyfile)
    )
    assert given is not None and given.ca_file is None


def test_serve_refuses_a_self_signed_certificate_with_a_real_fal_key(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FALGATE_DATA_DIR": str(tmp_path),
        "FALGATE_FAL_KEY": "id:secret",
        "FALGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FALGATE_TLS_SELF_SIGNED": "true",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FALGATE_TLS_SELF_SIGNED is for sandbox mode only" in result.stderr
    assert not (tmp_path / "tls").exists()


def test_serve_prints_the_one_line_for_fals_clients(tls_gateway: TlsGateway) -> None:
    ca = tls_gateway.ca_file.resolve()
    address = tls_gateway.address
    assert (
        f"SSL_CERT_FILE={ca} FAL_RUN_HOST={address}/fal/run "
        f"FAL_QUEUE_RUN_HOST={address}/fal/queue" in tls_gateway.log.read_text()
    )
