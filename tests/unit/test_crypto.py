"""Encrypted model files (`servable_framework.crypto`): format, wrong keys, in-memory loaders, key secrecy, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from servable_framework import crypto, procs
from servable_framework.crypto import DecryptionError, ModelKey
from servable_framework.server import ServableStartConfig

KEY = bytes(range(1, 33))


@pytest.fixture(autouse=True)
def no_process_key():
    """Each test starts with no process key and leaves none behind."""
    crypto.set_process_key(None)
    yield
    crypto.set_process_key(None)


@pytest.mark.parametrize("mode", crypto.MODES)
@pytest.mark.parametrize("size", [16, 24, 32])
def test_round_trip_every_key_size(mode: str, size: int) -> None:
    key = ModelKey(os.urandom(size), mode)
    for n in (0, 1, 15, 16, 17, 4096 + 3):
        data = os.urandom(n)
        blob = crypto.encrypt(data, key)
        assert blob[:4] == b"SFEM"
        assert n < 64 or data[:64] not in blob  # no plaintext in the file
        assert crypto.decrypt(blob, key) == data


@pytest.mark.parametrize("mode", crypto.MODES)
def test_wrong_key_is_detected_every_time(mode: str) -> None:
    """CBC too: encrypt-then-MAC makes a wrong key fail reliably, never a garbled 'success'."""
    blob = crypto.encrypt(b"weights" * 100, ModelKey(KEY, mode))
    for _ in range(50):
        with pytest.raises(DecryptionError, match="decryption failed .*wrong dec_key"):
            crypto.decrypt(blob, ModelKey(os.urandom(32), mode))


@pytest.mark.parametrize("mode", crypto.MODES)
def test_damaged_or_truncated_file_fails(mode: str) -> None:
    key = ModelKey(KEY, mode)
    blob = bytearray(crypto.encrypt(b"x" * 100, key))
    for pos in (5 + 1, 10, len(blob) // 2, len(blob) - 1):  # header, nonce/IV, body, tag/MAC
        bad = bytearray(blob)
        bad[pos] ^= 1
        with pytest.raises(DecryptionError, match="decryption failed"):
            crypto.decrypt(bytes(bad), key)
    with pytest.raises(DecryptionError, match="decryption failed"):
        crypto.decrypt(bytes(blob[:20]), key)


def test_wrong_mode_and_plaintext_are_clear_errors() -> None:
    blob = crypto.encrypt(b"abc", ModelKey(KEY, "AES-GCM"))
    with pytest.raises(DecryptionError, match="encrypted with AES-GCM, dec_mode is 'AES-CBC'"):
        crypto.decrypt(blob, ModelKey(KEY, "AES-CBC"))
    with pytest.raises(DecryptionError, match="not an encrypted model file"):
        crypto.decrypt(b"PK\x03\x04 a zip", ModelKey(KEY, "AES-GCM"))


def test_key_and_mode_checks_have_mindspore_texts() -> None:
    with pytest.raises(RuntimeError, match="Parameter 'dec_key' length 15 expected to be 16, 24 or 32"):
        crypto.check_key(b"k" * 15, "AES-GCM")
    with pytest.raises(RuntimeError, match="Parameter 'dec_key' should be bytes, but actually <class 'str'>"):
        crypto.check_key("k" * 16, "AES-GCM")
    with pytest.raises(RuntimeError, match="Parameter 'dec_key' should not be empty bytes"):
        crypto.check_key(b"", "AES-GCM")
    with pytest.raises(RuntimeError, match="Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'"):
        crypto.check_key(KEY, "AES-CTR")
    with pytest.raises(RuntimeError, match="Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'"):
        crypto.check_key(None, "aes-gcm")  # checked even without a key, as MindSpore does
    assert crypto.check_key(None, "AES-CBC") is None


def test_start_config_checks_and_never_shows_the_key(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Parameter 'dec_key' length 8 expected to be 16, 24 or 32"):
        ServableStartConfig(str(tmp_path), "add", dec_key=b"12345678")
    with pytest.raises(RuntimeError, match="Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'"):
        ServableStartConfig(str(tmp_path), "add", dec_key=KEY, dec_mode="AES")
    cfg = ServableStartConfig(str(tmp_path), "add", device_ids=0, dec_key=KEY, dec_mode="AES-CBC")
    payload = {"dec": cfg.decryption.to_payload()} if cfg.decryption else {}
    for text in (repr(cfg), str(cfg), repr(cfg.decryption), str(cfg.decryption), repr(payload), str(payload)):
        assert KEY.hex() not in text and repr(KEY) not in text and str(KEY) not in text, text
    assert "dec_key=<redacted>" in repr(cfg) and "AES-CBC" in repr(cfg)
    # ... while the JSON that carries it to a child holds the key (hex) for the child to take
    assert ModelKey.from_payload(json.loads(json.dumps(payload))["dec"]) == ModelKey(KEY, "AES-CBC")


def test_child_takes_its_key_from_the_payload_and_removes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    key = ModelKey(KEY, "AES-GCM")
    monkeypatch.setenv(procs.PAYLOAD_ENV, json.dumps({"rank": 0, crypto.PAYLOAD_FIELD: key.to_payload()}))
    crypto.set_process_key(crypto._UNSET)  # as in a freshly started child
    assert crypto.process_key() == key
    assert KEY.hex() not in os.environ[procs.PAYLOAD_ENV]  # children of the child do not inherit it
    assert json.loads(os.environ[procs.PAYLOAD_ENV]) == {"rank": 0}
    assert crypto.process_key() == key  # taken once, kept in memory


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def _encrypt_file(path: Path, key: ModelKey) -> None:
    path.write_bytes(crypto.encrypt(path.read_bytes(), key))


@pytest.mark.parametrize("mode", crypto.MODES)
def test_loaders_decrypt_in_memory_and_match_plaintext(tmp_path: Path, mode: str) -> None:
    from safetensors.torch import save_file

    key = ModelKey(KEY, mode)
    program = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net(), (torch.ones(4, 2),)), str(program))
    weights = tmp_path / "net.safetensors"
    save_file({"w": Net().w.detach().clone()}, str(weights))
    x = torch.randn(4, 2)
    plain_y = torch.export.load(crypto.model_source(str(program))).module()(x)
    plain_w = crypto.load_safetensors(str(weights))["w"].clone()  # load_file maps the file: copy it
    with crypto.safe_open(str(weights)) as f:
        assert torch.equal(f.get_slice("w")[:, 1:2], plain_w[:, 1:2])
    _encrypt_file(program, key)
    _encrypt_file(weights, key)
    before = set(tmp_path.iterdir())

    with pytest.raises(DecryptionError, match="is encrypted: start it with dec_key and dec_mode"):
        crypto.model_source(str(program))
    with pytest.raises(DecryptionError, match="is encrypted"):
        crypto.load_safetensors(str(weights))
    with pytest.raises(DecryptionError, match="is encrypted"):
        crypto.safe_open(str(weights))

    crypto.set_process_key(key)
    torch.testing.assert_close(torch.export.load(crypto.model_source(str(program))).module()(x), plain_y)
    assert torch.equal(crypto.load_safetensors(str(weights))["w"], plain_w)
    with crypto.safe_open(weights) as f:  # the handle interface the shards use: keys, get_tensor, get_slice
        assert f.keys() == ["w"]
        assert torch.equal(f.get_tensor("w"), plain_w)
        assert torch.equal(f.get_slice("w")[:, 1:2], plain_w[:, 1:2])
        assert torch.equal(f.get_slice("w")[1:2], plain_w[1:2])
    assert set(tmp_path.iterdir()) == before  # nothing decrypted was written to disk

    crypto.set_process_key(ModelKey(bytes(32), mode))
    with pytest.raises(DecryptionError, match=f"decryption failed for model file '{program}'"):
        crypto.model_source(str(program))


def test_cli_encrypts_with_key_file_or_env_and_never_prints_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    run = [sys.executable, "-m", "servable_framework.crypto"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([*run, "keygen", "--bytes", "24", str(key_file)], check=True, env=env)
    raw = key_file.read_bytes()
    assert len(raw) == 24 and (key_file.stat().st_mode & 0o777) == 0o600
    plain = tmp_path / "m.bin"
    plain.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    enc = tmp_path / "m.enc"
    out = subprocess.run([*run, "encrypt", "--key-file", str(key_file), "--mode", "AES-CBC", str(plain), str(enc)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert crypto.decrypt(enc.read_bytes(), ModelKey(raw, "AES-CBC")) == plain.read_bytes()
    back = tmp_path / "m.dec"
    out = subprocess.run([*run, "decrypt", "--key-env", "SF_TEST_KEY", "--mode", "AES-CBC", str(enc), str(back)],
                         capture_output=True, text=True, env={**env, "SF_TEST_KEY": raw.hex()})
    assert out.returncode == 0 and back.read_bytes() == plain.read_bytes()
    wrong = subprocess.run([*run, "decrypt", "--key-env", "SF_TEST_KEY", "--mode", "AES-CBC", str(enc), str(back)],
                           capture_output=True, text=True, env={**env, "SF_TEST_KEY": "00" * 24})
    assert wrong.returncode == 1 and "decryption failed" in wrong.stderr
    short = subprocess.run([*run, "encrypt", "--key-env", "SF_TEST_KEY", str(plain), str(enc)],
                           capture_output=True, text=True, env={**env, "SF_TEST_KEY": "ab" * 5})
    assert short.returncode == 1 and "Parameter 'dec_key' length 5 expected to be 16, 24 or 32" in short.stderr
    for o in (out, wrong, short):
        assert raw.hex() not in o.stdout + o.stderr
