"""The backend's TLS identity: the configured certificate, or a fresh self-signed one.

Without ``certificate``/``private_key`` in the service (design §5) each backend
makes an EC P-256 certificate for "localhost" (SANs: localhost, 127.0.0.1, ::1)
at start. Its SPKI SHA-256 in base64 is the form chromium takes in
``--ignore-certificate-errors-spki-list``, so it is logged and printed in the
readiness line.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from lb.errors import ConfigError

#: Lifetime of a generated certificate; a backend is restarted long before.
SELF_SIGNED_DAYS = 30
#: Backdating absorbs small clock differences between hosts.
SELF_SIGNED_BACKDATE = datetime.timedelta(hours=1)
#: Private key types TLS 1.3 can sign with (what aioquic accepts).
_SIGNING_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate (plus chain) and its private key, ready for aioquic."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()
    self_signed: bool = False

    @property
    def spki_sha256(self) -> str:
        """Base64 SHA-256 of the SubjectPublicKeyInfo (chromium's SPKI pin form)."""
        return spki_sha256(self.certificate)

    @property
    def certificate_pem(self) -> bytes:
        """The leaf certificate in PEM: a trust anchor for clients of a self-signed backend."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def apply(self, configuration: QuicConfiguration) -> None:
        configuration.certificate = self.certificate
        configuration.certificate_chain = list(self.chain)
        configuration.private_key = self.private_key


def spki_sha256(certificate: x509.Certificate) -> str:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def generate_self_signed(hostname: str = "localhost") -> TlsIdentity:
    """A new EC P-256 key and a self-signed certificate for ``hostname``, 127.0.0.1 and ::1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(hostname),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SELF_SIGNED_BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(certificate=cert, private_key=key, self_signed=True)


def load_identity(certificate: Path, private_key: Path) -> TlsIdentity:
    """Load a PEM certificate chain and its PEM private key; errors name the file."""
    try:
        chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{certificate}: cannot load certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{private_key}: cannot load private key: {exc}") from exc
    if not isinstance(key, _SIGNING_KEY_TYPES):
        raise ConfigError(f"{private_key}: unsupported private key type {type(key).__name__}")
    return TlsIdentity(certificate=chain[0], private_key=key, chain=tuple(chain[1:]))


def identity_for(certificate: Path | None, private_key: Path | None) -> TlsIdentity:
    """The configured identity, or a self-signed one when none is configured."""
    if certificate is not None and private_key is not None:
        return load_identity(certificate, private_key)
    return generate_self_signed()
