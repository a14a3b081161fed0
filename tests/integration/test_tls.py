"""REST over HTTPS (`SSLConfig`, contract §5.3): server TLS, mutual TLS, and the start-up errors for bad files.
Certificates are made for each run with the openssl command line tool (a test CA, server and client)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from servable_framework.tls import SSLConfig, server_context
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool")
X = [[1.0, 2.0], [3.0, 4.0]]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client", "other"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def trusting(pki: Path) -> ssl.SSLContext:
    """A client context that trusts the test CA (and presents no certificate)."""
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def start_https(servers, add_dir: Path, pki: Path, *extra: str):
    port = free_port()
    proc = servers.start(["-m", "tests.support.serve", "local", "--dir", str(add_dir), "--name", "add",
                          "--device-ids", "0", "--rest", f"127.0.0.1:{port}", "--ssl", str(pki / "server.pem"),
                          str(pki / "server.key"), *extra], "server-https")
    return proc, f"https://127.0.0.1:{port}"


def wait_https_ready(proc, base: str, **client: object) -> None:
    def ready() -> bool:
        assert proc.alive(), proc.log()
        try:
            return httpx.get(f"{base}/ready", timeout=5, **client).status_code == 200  # type: ignore[arg-type]
        except httpx.HTTPError:
            return False

    wait_until(ready, 90, "the HTTPS server to be ready")


def test_https_answers_and_plain_http_is_refused(servers, add_dir, pki) -> None:
    proc, base = start_https(servers, add_dir, pki)
    wait_https_ready(proc, base, verify=trusting(pki))
    r = httpx.post(f"{base}/model/add:add_common", json={"instances": [{"x1": X, "x2": X}]}, verify=trusting(pki))
    assert r.status_code == 200
    np.testing.assert_array_equal(r.json()["instances"][0]["y"], np.array(X) * 2)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer in clear text
        httpx.post(base.replace("https", "http") + "/model/add:add_common", json={"instances": [{"x1": X, "x2": X}]},
                   timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the test CA refuses the server
        httpx.get(f"{base}/health", timeout=5)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(servers, add_dir, pki) -> None:
    proc, base = start_https(servers, add_dir, pki, str(pki / "ca.pem"), "--verify-client")
    good = trusting(pki)
    good.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    wait_https_ready(proc, base, verify=good)
    r = httpx.post(f"{base}/model/add:add_common", json={"instances": [{"x1": X, "x2": X}]}, verify=good)
    assert r.status_code == 200 and r.json()["instances"][0]["y"] == [[2.0, 4.0], [6.0, 8.0]]
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake (or first read) fails
        httpx.get(f"{base}/health", verify=trusting(pki), timeout=5)
    assert proc.alive()  # and the server goes on
    assert httpx.get(f"{base}/health", verify=good).status_code == 200


def test_bad_files_fail_at_start_with_the_contract_text(pki, tmp_path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem file\n")
    cert, key = str(pki / "server.pem"), str(pki / "server.key")
    with pytest.raises(RuntimeError, match=f"load certificate_chain from {junk} failed"):
        server_context(SSLConfig(str(junk), key))
    with pytest.raises(RuntimeError, match=f"load private_key from {junk} failed"):
        server_context(SSLConfig(cert, str(junk)))
    with pytest.raises(RuntimeError, match="private_key is not consistent with certificate"):
        server_context(SSLConfig(cert, str(pki / "other.key")))
    with pytest.raises(RuntimeError, match="'custom_ca' is required"):
        SSLConfig(cert, key, verify_client=True)
    assert server_context(SSLConfig(cert, key, str(pki / "ca.pem"), True)).verify_mode == ssl.CERT_REQUIRED
