"""Encrypted model files (contract §5.1 ``dec_key``/``dec_mode``, §6.3): format, encryption, in-memory loading.

File format (all integers big-endian; one format for every model kind, ``.pt2`` or safetensors)::

    offset  size  field
    0       4     magic b"SFEM" (servable_framework encrypted model)
    4       1     format version, 1
    5       1     mode: 1 = AES-GCM, 2 = AES-CBC
    6       2     reserved, 0
    AES-GCM:  8  12  nonce (random)      | 20 ..-16  ciphertext | last 16  GCM tag
    AES-CBC:  8  16  IV (random)         | 24 ..-32  ciphertext (PKCS7-padded, AES-CBC) | last 32  HMAC-SHA256

The 8-byte header is authenticated too (GCM associated data; part of the HMAC input). AES-CBC alone cannot
tell a wrong key from a right one, so CBC files are encrypt-then-MAC: HMAC-SHA256 over header + IV +
ciphertext with a MAC key derived from ``dec_key`` (HKDF-SHA256, info ``b"servable_framework model HMAC"``),
checked (constant time) before anything is decrypted. AES uses ``dec_key`` itself (16/24/32 bytes =
AES-128/192/256). A wrong key, a wrong mode or a damaged file therefore always fails with
`DecryptionError` ("decryption failed ..."), never with a half-loaded model.

Decryption happens in memory only: `model_source` (``torch.export.load``), `load_safetensors` and
`safe_open` (safetensors) hand the loaders bytes or tensors, never a decrypted file on disk. In a checkpoint
directory (Qwen) the ``.safetensors`` files are the encrypted ones; JSON and tokenizer files stay plain.

The key of a child process (Worker, Agent) travels in its spawn payload as hex under `PAYLOAD_FIELD`, never on
a command line: a Worker's payload is JSON in its environment (readable only by the same OS user), an Agent's
comes through a pipe (`procs.spawn` with a standby child) and is set with `set_process_key`; no
code logs a payload, and in the parent it is held as a `Secret` whose repr is redacted. The child takes it
once (`process_key`) and removes it from its ``os.environ`` so that processes it starts do not inherit it.

CLI (the key from a file of raw key bytes, or from an environment variable holding it in hex)::

    python -m servable_framework.crypto keygen --bytes 32 model.key
    python -m servable_framework.crypto encrypt --key-file model.key --mode AES-GCM tensor_add.pt2 tensor_add.enc
    SF_MODEL_KEY=... python -m servable_framework.crypto decrypt --key-env SF_MODEL_KEY --mode AES-GCM IN OUT
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any

MODES = ("AES-GCM", "AES-CBC")
MAGIC = b"SFEM"
FORMAT_VERSION = 1
PAYLOAD_FIELD = "dec"
HEADER = struct.Struct(">4sBBH")
_MODE_IDS = {"AES-GCM": 1, "AES-CBC": 2}
_GCM_NONCE, _GCM_TAG, _CBC_IV, _MAC_LEN = 12, 16, 16, 32
_CHUNK = 64 << 20  # decrypt in 64 MiB steps: no single huge call into OpenSSL


class DecryptionError(RuntimeError):
    """A model file could not be decrypted: wrong key or mode, not an encrypted file, or damaged."""


class Secret(str):
    """A str (JSON-serialisable as itself) whose repr never shows its value: for keys inside payload dicts."""

    def __repr__(self) -> str:
        return "'<redacted>'"


@dataclass(frozen=True, repr=False)
class ModelKey:
    """A checked ``dec_key`` + ``dec_mode``. Its repr, str and payload form never show the key itself."""

    key: bytes
    mode: str

    def __repr__(self) -> str:
        return f"ModelKey(mode={self.mode!r}, key=<redacted {len(self.key) * 8}-bit>)"

    __str__ = __repr__

    def to_payload(self) -> dict[str, str]:
        return {"mode": self.mode, "key": Secret(self.key.hex())}

    @staticmethod
    def from_payload(data: dict[str, str]) -> ModelKey:
        return ModelKey(bytes.fromhex(data["key"]), data["mode"])


def check_key(dec_key: Any, dec_mode: Any) -> ModelKey | None:
    """Validate ``dec_key``/``dec_mode`` with MindSpore's texts; None when there is no key."""
    if dec_key is not None:
        if not isinstance(dec_key, bytes):
            raise RuntimeError(f"Parameter 'dec_key' should be bytes, but actually {type(dec_key)}")
        if not dec_key:
            raise RuntimeError("Parameter 'dec_key' should not be empty bytes")
        if len(dec_key) not in (16, 24, 32):
            raise RuntimeError(f"Parameter 'dec_key' length {len(dec_key)} expected to be 16, 24 or 32")
    if not isinstance(dec_mode, str):
        raise RuntimeError(f"Parameter 'dec_mode' should be str, but actually {type(dec_mode)}")
    if not dec_mode:
        raise RuntimeError("Parameter 'dec_mode' should not be empty str")
    if dec_mode not in MODES:
        raise RuntimeError("Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'")
    return None if dec_key is None else ModelKey(bytes(dec_key), dec_mode)


# -- format ---------------------------------------------------------------------------------------------------
def _mac_key(key: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), _MAC_LEN, salt=None, info=b"servable_framework model HMAC").derive(key)


def _mac(key: bytes, *parts: bytes | memoryview) -> bytes:
    mac = hmac.new(_mac_key(key), digestmod="sha256")
    for part in parts:
        mac.update(part)
    return mac.digest()


def _run(ctx: Any, data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    out = [ctx.update(view[i:i + _CHUNK]) for i in range(0, len(view), _CHUNK)]
    out.append(ctx.finalize())
    return b"".join(out)


def encrypt(data: bytes, key: ModelKey) -> bytes:
    """``data`` (a model file's bytes) as an encrypted model file in the format above (fresh random nonce/IV)."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    header = HEADER.pack(MAGIC, FORMAT_VERSION, _MODE_IDS[key.mode], 0)
    if key.mode == "AES-GCM":
        nonce = os.urandom(_GCM_NONCE)
        enc = Cipher(algorithms.AES(key.key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(header)
        body = _run(enc, data)
        return header + nonce + body + enc.tag
    iv = os.urandom(_CBC_IV)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(data) + padder.finalize()
    body = _run(Cipher(algorithms.AES(key.key), modes.CBC(iv)).encryptor(), padded)
    return header + iv + body + _mac(key.key, header, iv, body)


def is_encrypted(head: bytes) -> bool:
    """Whether bytes starting a file are our header (magic and a known format version)."""
    return len(head) >= HEADER.size and head[:4] == MAGIC and head[4] == FORMAT_VERSION


def decrypt(blob: bytes, key: ModelKey, name: str = "model file") -> bytes:
    """The plaintext of an encrypted model file, or `DecryptionError` naming ``name`` (never the key)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    failed = f"decryption failed for {name}"
    if not is_encrypted(blob):
        raise DecryptionError(f"{failed}: it is not an encrypted model file (no servable_framework header)")
    header = bytes(blob[:HEADER.size])
    file_mode = next((m for m, i in _MODE_IDS.items() if i == header[5]), None)
    if file_mode is None:
        raise DecryptionError(f"{failed}: unknown encryption mode id {header[5]} in the file header")
    if file_mode != key.mode:
        raise DecryptionError(f"{failed}: the file was encrypted with {file_mode}, dec_mode is '{key.mode}'")
    view = memoryview(blob)[HEADER.size:]
    wrong = f"{failed}: wrong dec_key, or the file is damaged"
    if key.mode == "AES-GCM":
        if len(view) < _GCM_NONCE + _GCM_TAG:
            raise DecryptionError(f"{failed}: the file is truncated")
        nonce, body, tag = view[:_GCM_NONCE], view[_GCM_NONCE:-_GCM_TAG], view[-_GCM_TAG:]
        dec = Cipher(algorithms.AES(key.key), modes.GCM(bytes(nonce), bytes(tag))).decryptor()
        dec.authenticate_additional_data(header)
        try:
            return _run(dec, body)
        except InvalidTag:
            raise DecryptionError(wrong) from None
    if len(view) < _CBC_IV + 16 + _MAC_LEN or (len(view) - _CBC_IV - _MAC_LEN) % 16:
        raise DecryptionError(f"{failed}: the file is truncated")
    iv, body, mac = view[:_CBC_IV], view[_CBC_IV:-_MAC_LEN], view[-_MAC_LEN:]
    if not hmac.compare_digest(_mac(key.key, header, iv, body), mac):  # encrypt-then-MAC: check first
        raise DecryptionError(wrong)
    padded = _run(Cipher(algorithms.AES(key.key), modes.CBC(bytes(iv))).decryptor(), body)
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:  # only reachable with a forged MAC
        raise DecryptionError(wrong) from None


# -- this process's key, and loaders -----------------------------------------------------------------------
_UNSET: Any = object()
_process_key: ModelKey | None = _UNSET


def process_key() -> ModelKey | None:
    """The key this process was started with (Worker / Agent payload), or None. Taken once: afterwards the
    key is removed from ``os.environ`` (children of this process do not inherit it)."""
    global _process_key
    if _process_key is _UNSET:
        from servable_framework import procs

        _process_key = None
        raw = os.environ.get(procs.PAYLOAD_ENV)
        if raw:
            payload = json.loads(raw)
            data = payload.pop(PAYLOAD_FIELD, None) if isinstance(payload, dict) else None
            if data:
                _process_key = ModelKey.from_payload(data)
                os.environ[procs.PAYLOAD_ENV] = json.dumps(payload)
    return _process_key


def set_process_key(key: ModelKey | None) -> None:
    """Set the key this process loads model files with (in-process use and tests; children use the payload)."""
    global _process_key
    _process_key = key


def read_model(path: str, key: ModelKey | None = _UNSET) -> bytes:
    """The plaintext bytes of a model file: decrypted in memory when there is a key (default: `process_key`)."""
    key = process_key() if key is _UNSET else key
    with open(path, "rb") as f:
        data = f.read()
    if key is None:
        _refuse_encrypted(path, data[:HEADER.size])
        return data
    return decrypt(data, key, f"model file '{path}'")


def model_source(path: str) -> str | io.BytesIO:
    """What to give ``torch.export.load``: the path itself without a key (after refusing an encrypted file
    with a clear error), else the decrypted bytes in memory."""
    if process_key() is None:
        with open(path, "rb") as f:
            _refuse_encrypted(path, f.read(HEADER.size))
        return path
    return io.BytesIO(read_model(path))


def load_safetensors(path: str) -> dict[str, Any]:
    """``safetensors.torch.load_file(path)``, decrypting in memory when this process has a key."""
    from safetensors.torch import load, load_file

    if process_key() is None:
        with open(path, "rb") as f:
            _refuse_encrypted(path, f.read(HEADER.size))
        return dict(load_file(path))
    return dict(load(read_model(path)))


class _TensorFile:
    """The ``safe_open`` handle interface (keys, get_tensor, get_slice, ``with``) over tensors decrypted in
    memory. A torch tensor slices like a safetensors slice (``[:]``, ``[a:b]``, ``[:, a:b]``)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def __enter__(self) -> _TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tensors = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> Any:
        return self._tensors[name]

    def get_slice(self, name: str) -> Any:
        return self._tensors[name]


def safe_open(path: str | os.PathLike[str], framework: str = "pt", device: str = "cpu") -> Any:
    """``safetensors.safe_open`` (lazy, sliced reads; usable with or without ``with``) when this process has
    no key; with one, the whole file is decrypted in memory (tensors on the CPU) behind the same interface."""
    from safetensors import safe_open as open_plain

    path = os.fspath(path)
    if process_key() is None:
        with open(path, "rb") as f:
            _refuse_encrypted(path, f.read(HEADER.size))
        return open_plain(path, framework=framework, device=device)
    return _TensorFile(load_safetensors(path))


def _refuse_encrypted(path: str, head: bytes) -> None:
    if is_encrypted(head):
        raise DecryptionError(f"model file '{path}' is encrypted: start it with dec_key and dec_mode")


# -- key files and CLI --------------------------------------------------------------------------------------
def read_key_file(path: str) -> bytes:
    """A key file holds the raw key bytes (16, 24 or 32), exactly what ``dec_key`` takes."""
    with open(path, "rb") as f:
        return f.read()


def _cli_key(args: argparse.Namespace) -> ModelKey:
    if args.key_file:
        raw = read_key_file(args.key_file)
    else:
        text = os.environ.get(args.key_env, "")
        if not text:
            raise RuntimeError(f"environment variable {args.key_env} is not set")
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise RuntimeError(f"environment variable {args.key_env} must hold the key in hex") from None
    key = check_key(raw, args.mode)
    assert key is not None
    return key


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servable_framework.crypto",
                                     description="Encrypt model files for dec_key/dec_mode (format: see the module).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="write a new random key file (raw bytes, mode 0600)")
    gen.add_argument("--bytes", type=int, choices=(16, 24, 32), default=32)
    gen.add_argument("out")
    for name in ("encrypt", "decrypt"):
        cmd = sub.add_parser(name, help=f"{name} a model file")
        source = cmd.add_mutually_exclusive_group(required=True)
        source.add_argument("--key-file", help="file holding the raw key bytes")
        source.add_argument("--key-env", help="environment variable holding the key in hex")
        cmd.add_argument("--mode", default="AES-GCM", help="AES-GCM (default) or AES-CBC")
        cmd.add_argument("input")
        cmd.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            _write_private(args.out, os.urandom(args.bytes))
            return 0
        key = _cli_key(args)
        with open(args.input, "rb") as f:
            data = f.read()
        out = encrypt(data, key) if args.command == "encrypt" else decrypt(data, key, f"'{args.input}'")
        _write_private(args.output, out)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
