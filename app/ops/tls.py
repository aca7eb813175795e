"""TLS for ``falgate serve``: the operator's certificate, or a development CA in sandbox mode.

fal's Python client only speaks https, so a local gateway needs a certificate the client
trusts. ``FALGATE_TLS_SELF_SIGNED=true`` (sandbox mode only) creates, once, a private CA
``<data dir>/tls/ca.pem`` and a certificate for ``localhost`` and ``127.0.0.1`` signed by it;
``SSL_CERT_FILE=<data dir>/tls/ca.pem`` then makes httpx (and so fal-client) trust it, and
``NODE_EXTRA_CA_CERTS`` does the same for node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.settings import Settings

_VALID_DAYS = 825  # the longest server-certificate lifetime Apple's TLS stack accepts
_HOSTS = ("localhost",)
_ADDRESSES = ("127.0.0.1", "::1")


class TlsConfigError(ValueError):
    """The TLS settings cannot be served; the message names the setting to fix."""


@dataclass(frozen=True)
class TlsFiles:
    certfile: Path
    keyfile: Path
    ca_file: Path | None = None  # set for the development CA


def tls_files(settings: Settings) -> TlsFiles | None:
    """The certificate and key ``falgate serve`` should use, or None for plain http."""
    if settings.tls_self_signed:
        if not settings.sandbox_mode:
            raise TlsConfigError(
                "FALGATE_TLS_SELF_SIGNED is for sandbox mode only: with a real fal key set "
                "FALGATE_TLS_CERTFILE and FALGATE_TLS_KEYFILE."
            )
        if settings.tls_certfile or settings.tls_keyfile:
            raise TlsConfigError(
                "Set either FALGATE_TLS_SELF_SIGNED or FALGATE_TLS_CERTFILE/FALGATE_TLS_KEYFILE."
            )
        return development_certificate(settings.data_dir / "tls")
    if settings.tls_certfile is None and settings.tls_keyfile is None:
        return None
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        raise TlsConfigError("FALGATE_TLS_CERTFILE and FALGATE_TLS_KEYFILE go together.")
    for name, path in (
        ("FALGATE_TLS_CERTFILE", settings.tls_certfile),
        ("FALGATE_TLS_KEYFILE", settings.tls_keyfile),
    ):
        if not path.is_file():
            raise TlsConfigError(f"{name}: no such file {path}")
    return TlsFiles(settings.tls_certfile, settings.tls_keyfile)


def development_certificate(directory: Path) -> TlsFiles:
    """A CA and a localhost certificate under ``directory``, created on first use."""
    files = TlsFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    assert files.ca_file is not None
    if files.certfile.exists() and files.keyfile.exists() and files.ca_file.exists():
        certificate = x509.load_pem_x509_certificate(files.certfile.read_bytes())
        if certificate.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
            return files
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=_VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "falgate development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in _HOSTS]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in _ADDRESSES]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write(files.ca_file, ca.public_bytes(pem), 0o644)
    _write(files.certfile, certificate.public_bytes(pem), 0o644)
    private = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(files.keyfile, private, 0o600)
    return files


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
