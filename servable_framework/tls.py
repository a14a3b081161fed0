"""HTTPS for the REST front end: MindSpore's ``SSLConfig`` (contract §5.3).

``SSLConfig(certificate, private_key, custom_ca=None, verify_client=False)``: PEM file paths; with
``verify_client=True`` clients must present a certificate signed by ``custom_ca`` (mutual TLS). TLS 1.2 or
newer, ECDHE key exchange with AES-GCM or ChaCha20 only. The files are checked when the front end starts,
with the contract's error texts, so a bad key fails ``start_restful_server`` instead of the first handshake.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class SSLConfig:
    certificate: str
    private_key: str
    custom_ca: str | None = None
    verify_client: bool = False

    def __post_init__(self) -> None:
        for name in ("certificate", "private_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise RuntimeError(f"Parameter '{name}' should be a non-empty str (a PEM file path)")
        if self.custom_ca is not None and (not isinstance(self.custom_ca, str) or not self.custom_ca):
            raise RuntimeError("Parameter 'custom_ca' should be None or a non-empty str (a PEM file path)")
        if not isinstance(self.verify_client, bool):
            raise RuntimeError("Parameter 'verify_client' should be bool")
        if self.verify_client and self.custom_ca is None:
            raise RuntimeError("Parameter 'custom_ca' is required when 'verify_client' is True")


def server_context(cfg: SSLConfig) -> ssl.SSLContext:
    """The server's TLS context, or RuntimeError with the contract's text for a bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    try:
        with open(cfg.certificate, encoding="ascii") as f:
            ssl.PEM_cert_to_DER_cert(f.read())
    except (OSError, ValueError):
        raise RuntimeError(f"Serving Error: load certificate_chain from {cfg.certificate} failed") from None
    if not os.access(cfg.private_key, os.R_OK):
        raise RuntimeError(f"Serving Error: load private_key from {cfg.private_key} failed")
    try:
        ctx.load_cert_chain(cfg.certificate, cfg.private_key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise RuntimeError("Serving Error: private_key is not consistent with certificate") from None
        raise RuntimeError(f"Serving Error: load private_key from {cfg.private_key} failed") from None
    if cfg.custom_ca is not None:
        try:
            ctx.load_verify_locations(cfg.custom_ca)
        except (OSError, ssl.SSLError):
            raise RuntimeError(f"Serving Error: load custom_ca from {cfg.custom_ca} failed") from None
    if cfg.verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
