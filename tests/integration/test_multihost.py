"""Multi-host for real: every host is a network namespace with its own address (`tests/support/netns.py`).

Main and the Distributed Worker run on host ``main`` (10.77.0.1), the Agents of hosts ``h1`` (10.77.0.11) and
``h2`` (10.77.0.12) on theirs, each host's Agents started there by their own startup process, which finds its
ranks in the rank table by address (MindSpore's multi-host flow). Nothing but the bridge joins the hosts: an
Agent reaches the Worker, the rendezvous store and its peers only at the addresses the rank table and the
Worker's configured address name. The test process talks REST to Main from inside host ``main``.

Answers must be what one host gives:

* MatMul with small integer ``x`` and ``W`` (every column of ``W`` different): every product and sum is exact in
  float32, so any correct run, one host or two, returns exactly ``-(x @ W)``, and a column slice in the wrong
  place changes the answer;
* the tiny Qwen2.5 text model: the greedy text of the unsharded Hugging Face model, and (rank processes of
  ``qwen_text_harness.py`` on two hosts, TP 2 and a stage per host) its per-step logits within the single-host
  numeric tests' tolerance (``ATOL``, 1e-5).

Skipped, with the reason, where network namespaces cannot be made (not root, no ``ip``, no permission).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MATMUL_CONFIG, Servers
from tests.integration import test_qwen_text_numeric as qwen_numeric
from tests.support import netns
from tests.support.harness_runs import load_runs
from tests.support.netns import NetnsProc, NetnsRest, Network
from tests.support.procs import REPO, child_env, wait_until

HOSTS = {"main": "10.77.0.1", "h1": "10.77.0.11", "h2": "10.77.0.12"}
FAST_HEARTBEAT = {"SERVABLE_HEARTBEAT_INTERVAL_S": "0.5", "SERVABLE_HEARTBEAT_TIMEOUT_S": "2"}
DETECT_S = 10.0  # a lost host shows as an error within this (2 s heartbeat timeout, a loaded machine)
READY_S = 180.0
K, N = 12, 8  # MatMul: x [rows, K] @ W [K, N]


# -- the network and what every process gets ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    netns.remove_stale()
    root_interfaces = socket.if_nameindex()
    with netns.network(HOSTS) as network:
        assert socket.if_nameindex() == root_interfaces, "an interface was added to the root namespace"
        yield network
    assert not network.exists(), "the namespaces outlived the tests"
    assert socket.if_nameindex() == root_interfaces, "the root namespace's interfaces changed"


@dataclass
class Deployment:
    """What every process of a multi-host servable gets on top of the test defaults: the one place for
    deployment-wide settings. ``env`` goes to Main and every Agent startup process (their children inherit it);
    ``main_args`` / ``agent_args`` are appended to the ``tests.support.serve`` / ``tests.support.agents``
    command lines."""

    env: dict[str, str] = field(default_factory=dict)
    main_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """One CurveZMQ keys directory for every process: the Distributed Worker listens on 10.77.0.1, which other
    hosts reach, so its links must be authenticated (`servable_framework.curve`)."""
    from servable_framework import curve

    keys = curve.create(tmp_path_factory.mktemp("keys"))
    return Deployment(env={curve.ENV: str(keys)})


def write_rank_table(path: Path, rank_hosts: list[str]) -> Path:
    """A ``server_list`` rank table: rank r on host ``rank_hosts[r]`` (device ids counted per host). One entry per
    rank, so hosts may interleave while ranks stay in order."""
    devices: dict[str, int] = {}
    servers = []
    for rank, host in enumerate(rank_hosts):
        device = devices.get(host, 0)
        devices[host] = device + 1
        servers.append({"server_id": HOSTS[host], "device": [{"device_id": str(device), "rank_id": str(rank)}]})
    path.write_text(json.dumps({"version": "1.0", "server_count": str(len(devices)), "server_list": servers,
                                "status": "completed"}))
    return path


class Cluster:
    """One servable spread over the hosts: Main + Distributed Worker on ``main`` (the Worker listening on
    ``10.77.0.1:<port>``), the Agents of each host started there. Processes join ``servers`` (stopped at test
    teardown, logs shown on failure)."""

    def __init__(self, net: Network, servers: Servers, deployment: Deployment, servable_dir: Path, name: str,
                 rank_table: Path, **env: str) -> None:
        self.net, self.servers, self.deployment = net, servers, deployment
        self.servable_dir, self.name, self.rank_table = servable_dir, name, rank_table
        self.extra_env = env
        self.dist_address = f"{net.ip('main')}:{net.port()}"
        self.agents: dict[str, NetnsProc] = {}
        self.server: NetnsProc | None = None
        self.rest: NetnsRest | None = None
        self._started = 0

    def env(self) -> dict[str, str]:
        return child_env(**self.deployment.env, **self.extra_env)

    def start(self, host: str, args: list[str], name: str) -> NetnsProc:
        self._started += 1
        proc = NetnsProc(self.net, host, args, self.servers.tmp, f"{name}-{self._started}", self.servers.tmp,
                         self.env())
        self.servers.procs.append(proc)
        return proc

    def start_main(self) -> NetnsRest:
        rest_port, zmq_port = self.net.port(), self.net.port()
        self.server = self.start("main", ["-m", "tests.support.serve", "distributed", "--dir", str(self.servable_dir),
                                          "--name", self.name, "--rank-table", str(self.rank_table),
                                          "--dist-address", self.dist_address, "--rest", f"127.0.0.1:{rest_port}",
                                          "--zmq", f"127.0.0.1:{zmq_port}", *self.deployment.main_args], "main")
        self.rest = NetnsRest(self.net, "main", rest_port)
        return self.rest

    def start_agents(self, host: str, files: list[str]) -> NetnsProc:
        """``host``'s Agent startup process: it picks the rank table's ranks of its own address."""
        proc = self.start(host, ["-m", "tests.support.agents", self.dist_address, *files,
                                 *self.deployment.agent_args], f"agents-{host}")
        self.agents[host] = proc
        return proc

    def wait_ready(self, timeout_s: float = READY_S) -> NetnsRest:
        assert self.server is not None and self.rest is not None
        self.rest.wait_ready(self.server, timeout_s)
        return self.rest

    def agent_pids(self, host: str) -> list[int]:
        """The Agent processes (not their startup process) running on ``host``."""
        return sorted(p for p in self.net.pids(host) if "-m servable_framework.agent" in cmdline(p))

    def close(self) -> None:
        if self.rest is not None:
            self.rest.close()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def log_has(proc: NetnsProc, text: str) -> Callable[[], bool]:
    def check() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.log()[-3000:]}")
        return text in proc.log()

    return check


def stays_unready(rest: NetnsRest, seconds: float) -> None:
    """Watch /ready for ``seconds``: it must not turn ready (nothing may make it so by itself)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not rest.is_ready(), "the servable turned ready while a host was missing"
        time.sleep(0.2)


# -- MatMul ------------------------------------------------------------------------------------------------------
def int_matrix(rng: np.random.Generator, shape: tuple[int, int], bound: int) -> np.ndarray:
    return rng.integers(-bound, bound + 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """Integer matrices: W0 [K, K] (the first pipeline stage), W [K, N] whose columns all differ."""
    rng = np.random.default_rng(11)
    w = int_matrix(rng, (K, N), 4)
    while len({tuple(col) for col in w.T}) != N:
        w = int_matrix(rng, (K, N), 4)
    return {"w0": int_matrix(rng, (K, K), 2), "w": w}


def matmul_dir(root: Path, rank_hosts: list[str], stages: int, layers: list[np.ndarray]) -> Path:
    """A `matmul` servable over ``len(rank_hosts)`` ranks and ``stages`` stages; stage s multiplies by
    ``layers[s]``, column-split over its TP ranks: model/device{rank}/matmul.safetensors."""
    from safetensors.numpy import save_file

    ranks = len(rank_hosts)
    tp = ranks // stages
    (root / "matmul").mkdir(parents=True)
    (root / "matmul" / "servable_config.py").write_text(
        MATMUL_CONFIG.format(ranks=ranks, stages=stages, batch=False, pipeline=stages > 1))
    for rank in range(ranks):
        stage, tp_rank = divmod(rank, tp)
        full = layers[stage]
        cols = full.shape[1] // tp
        (root / "model" / f"device{rank}").mkdir(parents=True)
        save_file({"w": np.ascontiguousarray(full[:, tp_rank * cols:(tp_rank + 1) * cols])},
                  str(root / "model" / f"device{rank}" / "matmul.safetensors"))
    write_rank_table(root / "rank_table.json", rank_hosts)
    return root


def shard_files(root: Path, ranks: list[int]) -> list[str]:
    return [str(root / "model" / f"device{r}" / "matmul.safetensors") for r in ranks]


def exact(x: np.ndarray, *layers: np.ndarray) -> np.ndarray:
    """``-(x @ layers...)`` in int64: the exact answer (float32 holds every intermediate exactly)."""
    y = x.astype(np.int64)
    for w in layers:
        y = y @ w.astype(np.int64)
    assert np.abs(y).max() < 2 ** 24
    return -y


def inputs(seed: int, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [int_matrix(rng, (5, K), 3) for _ in range(count)]


def predict(rest: NetnsRest, x: np.ndarray) -> Any:
    return rest.post("/model/matmul:predict", {"instances": [{"x": x.tolist()}]})


def answers_exactly(rest: NetnsRest, x: np.ndarray, expected: np.ndarray) -> None:
    r = predict(rest, x)
    assert r.status_code == 200, r.text
    y = np.array(r.json()["instances"][0]["y"])
    assert y.shape == expected.shape and np.array_equal(y, expected), (y, expected)


@pytest.fixture(scope="module")
def tp_cluster(net: Network, module_servers: Servers, deployment: Deployment, weights: dict[str, np.ndarray],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """MatMul, TP 2: rank 0 on h1, rank 1 on h2 (the all-gather crosses hosts)."""
    root = matmul_dir(tmp_path_factory.mktemp("mm_tp"), ["h1", "h2"], 1, [weights["w"]])
    cluster = Cluster(net, module_servers, deployment, root, "matmul", root / "rank_table.json", **FAST_HEARTBEAT)
    cluster.start_main()
    cluster.start_agents("h1", shard_files(root, [0]))
    cluster.start_agents("h2", shard_files(root, [1]))
    cluster.wait_ready()
    yield cluster
    cluster.close()


def test_rank_table_host_must_be_an_address_of_the_starting_machine(net: Network) -> None:
    """On h1 (addresses 127.0.0.1 and 10.77.0.11): its ranks are found by address; a rank whose host is h2's
    address, or a rank table with none of h1's addresses, is refused naming the address and h1's addresses."""
    script = ("import json; from servable_framework.agent.launcher import local_ranks\n"
              "table = [('10.77.0.11', 0), ('10.77.0.12', 0), ('10.77.0.12', 1), ('10.77.0.11', 1)]\n"
              "out = {'auto': local_ranks(table, None), 'start0': local_ranks(table, 0)}\n"
              "for name, args in (('start1', (table, 1)), ('none', ([('10.77.0.12', 0)], None))):\n"
              "    try:\n"
              "        local_ranks(*args)\n"
              "    except RuntimeError as exc:\n"
              "        out[name] = str(exc)\n"
              "print(json.dumps(out))\n")
    done = net.run("h1", ["-c", script])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["auto"] == [0, 3] and out["start0"] == [0, 3]
    assert "The rank table host of rank 1 '10.77.0.12' is not an address of this machine" in out["start1"]
    assert "addresses: 127.0.0.1, 10.77.0.11" in out["start1"], out["start1"]
    assert "Get local machine ip failed, rank table ips: ['10.77.0.12']" in out["none"]
    assert "this machine's addresses: 127.0.0.1, 10.77.0.11" in out["none"], out["none"]


def test_tensor_parallel_across_two_hosts(tp_cluster: Cluster, weights: dict[str, np.ndarray]) -> None:
    rest = tp_cluster.rest
    assert rest is not None
    w = weights["w"]
    swapped = np.concatenate([w[:, N // 2:], w[:, :N // 2]], axis=1)
    for x in inputs(1):
        expected = exact(x, w)
        assert not np.array_equal(expected, exact(x, swapped))  # the halves in the wrong place would show
        answers_exactly(rest, x, expected)


def test_every_listening_socket_is_on_an_explicit_address(tp_cluster: Cluster) -> None:
    """Agents listen (gloo) only on their rank table address; the Distributed Worker and its rendezvous store only
    on its configured address; Main's front ends on the configured 127.0.0.1. Nothing on a wildcard."""
    net = tp_cluster.net
    for host in ("h1", "h2"):
        pids = tp_cluster.agent_pids(host)
        assert pids, f"no agent running on {host}"
        sockets = netns.listening(pids[0])
        assert sockets, f"nothing listens on {host}: gloo did not bind its rank's address"
        assert {address for address, _ in sockets} == {net.ip(host)}, (host, sockets)
    assert tp_cluster.server is not None
    sockets = netns.listening(tp_cluster.server.pid)
    dist_port = int(tp_cluster.dist_address.rsplit(":", 1)[1])
    assert (net.ip("main"), dist_port) in sockets
    # the rendezvous store: on the Worker's address too (its port is ephemeral)
    assert [s for s in sockets if s[0] == net.ip("main") and s[1] != dist_port], sockets
    assert {address for address, _ in sockets} <= {"127.0.0.1", net.ip("main")}, sockets


def wait_error(rest: NetnsRest, x: np.ndarray, timeout_s: float = DETECT_S) -> str:
    """Poll with real requests until one is answered with an error; returns its text."""
    seen: list[str] = []

    def failed() -> bool:
        r = predict(rest, x)
        if r.status_code != 200:
            seen.append(r.json()["error_msg"])
            return True
        return False

    wait_until(failed, timeout_s, "an error answer", interval_s=0.05)
    return seen[-1]


def test_one_hosts_agents_killed_then_the_servable_recovers(tp_cluster: Cluster,
                                                             weights: dict[str, np.ndarray]) -> None:
    """kill -9 of h2's Agent: errors naming the rank at once, then h2's startup process restarts it and every rank
    re-joins. kill -9 of everything on h2 (the host is gone): errors until h2's Agents are started there again,
    then the servable answers correctly, without restarting Main."""
    cluster, rest = tp_cluster, tp_cluster.rest
    assert rest is not None and cluster.server is not None
    x = inputs(2, 1)[0]
    expected = exact(x, weights["w"])
    answers_exactly(rest, x, expected)

    old = cluster.agent_pids("h2")
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    error = wait_error(rest, x)
    assert "servable is not available" in error and "rank 1" in error, error
    wait_until(rest.is_ready, READY_S, "recovery after h2's startup process restarted its agent")
    answers_exactly(rest, x, expected)
    assert set(cluster.agent_pids("h2")).isdisjoint(old)

    for pid in cluster.net.pids("h2"):  # the whole host: its startup process and its Agents
        os.kill(pid, signal.SIGKILL)
    error = wait_error(rest, x)
    assert "servable is not available" in error, error
    wait_until(lambda: not cluster.net.pids("h2"), 10, "h2 to be empty")
    stays_unready(rest, 2.0)
    cluster.start_agents("h2", shard_files(cluster.servable_dir, [1]))
    wait_until(rest.is_ready, READY_S, "recovery once h2's agents are started again")
    answers_exactly(rest, x, expected)
    assert cluster.server.alive()


def test_pipeline_stage_per_host_and_a_late_host(net: Network, servers: Servers, deployment: Deployment,
                                                 weights: dict[str, np.ndarray], tmp_path: Path) -> None:
    """MatMul, 2 stages x TP 1: stage 0 on h1, stage 1 on h2 (the activations cross hosts). h2 starts late: the
    servable is not ready while it is missing (Agents started on a host the rank table does not name are refused
    with the addresses), and becomes ready, answering exactly, once h2's Agents arrive."""
    root = matmul_dir(tmp_path / "mm_pp", ["h1", "h2"], 2, [weights["w0"], weights["w"]])
    cluster = Cluster(net, servers, deployment, root, "matmul", root / "rank_table.json", **FAST_HEARTBEAT)
    rest = cluster.start_main()
    try:
        h1 = cluster.start_agents("h1", shard_files(root, [0]))
        wait_until(log_has(h1, "rendezvous at"), READY_S, "h1's agent to wait in the rendezvous")
        stays_unready(rest, 3.0)
        wrong = cluster.start_agents("main", shard_files(root, [1]))  # main holds no address of the rank table
        assert wrong.wait(120) != 0
        assert "Get local machine ip failed, rank table ips: ['10.77.0.11', '10.77.0.12'], this machine's " \
               "addresses: 127.0.0.1, 10.77.0.1" in wrong.log(), wrong.log()[-3000:]
        assert not rest.is_ready()
        cluster.start_agents("h2", shard_files(root, [1]))
        cluster.wait_ready()
        xs = inputs(3, 6)
        with ThreadPoolExecutor(3) as pool:  # several batches in the pipeline at once
            answers = list(pool.map(lambda x: predict(rest, x), xs))
        for x, r in zip(xs, answers):
            assert r.status_code == 200, r.text
            assert np.array_equal(np.array(r.json()["instances"][0]["y"]), exact(x, weights["w0"], weights["w"]))
    finally:
        cluster.close()


# -- tiny Qwen2.5 text -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from servables.qwen_text.tiny_model import build_tiny_qwen_text

    return Path(build_tiny_qwen_text(tmp_path_factory.mktemp("tiny")))


def hf_greedy(ckpt: Path, prompts: list[tuple[str, int]]) -> list[str]:
    """The unsharded Hugging Face model's greedy text for each (user prompt, max_new_tokens)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for prompt, n in prompts:
        enc: Any = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False)
        out.append(str(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    return out


def test_qwen_text_tp_and_pp_across_hosts(net: Network, servers: Servers, deployment: Deployment, tiny_ckpt: Path,
                                          tmp_path: Path) -> None:
    """Tiny Qwen2.5 text, 2 stages x TP 2 with the hosts interleaved (ranks 0, 3 on h1; 1, 2 on h2): both TP
    groups span the hosts and both stage-to-stage hops (0 -> 2, 1 -> 3) cross them. The greedy text equals the
    unsharded model's."""
    table = write_rank_table(tmp_path / "rank_table.json", ["h1", "h2", "h2", "h1"])
    cluster = Cluster(net, servers, deployment, REPO / "servables", "qwen_text", table,
                      QWEN_TEXT_CHECKPOINT=str(tiny_ckpt), QWEN_TEXT_RANK_SIZE="4", QWEN_TEXT_STAGE_SIZE="2")
    rest = cluster.start_main()
    try:
        cluster.start_agents("h1", [str(tiny_ckpt)] * 2)
        cluster.start_agents("h2", [str(tiny_ckpt)] * 2)
        prompts = [("Hello, world! Tell me about tensor parallel inference.", 12), ("Hi", 5),
                   ("The quick brown fox jumps over the lazy dog.", 9)]
        expected = hf_greedy(tiny_ckpt, prompts)  # while the cluster starts
        cluster.wait_ready()
        assert "starting agents for ranks [0, 3]" in cluster.agents["h1"].log()
        assert "starting agents for ranks [1, 2]" in cluster.agents["h2"].log()
        r = rest.post("/model/qwen_text:predict", {"instances": [{"prompt": p, "max_new_tokens": n}
                                                                 for p, n in prompts]})
        assert r.status_code == 200, r.text
        assert [i["text"] for i in r.json()["instances"]] == expected
        r = rest.post("/model/qwen_text:predict", {"instances": [{"prompt": prompts[0][0], "max_new_tokens": 12}]})
        assert r.status_code == 200 and r.json()["instances"][0]["text"] == expected[0], r.text
    finally:
        cluster.close()


# -- tiny Qwen2.5 text logits: rank processes on two hosts ---------------------------------------------------------
LOGIT_LAYOUTS = {"tp2": 1, "pp2": 2}  # name: stage_size; world 2, rank 0 on h1 and rank 1 on h2
LOGIT_RANK_HOSTS = ["h1", "h2"]
LOGIT_TIMEOUT_S = 240.0  # under pytest-timeout's 300 s, so a stuck rank fails with the ranks' logs
ATOL, HARNESS, SAMPLED, greedy = qwen_numeric.ATOL, qwen_numeric.HARNESS, qwen_numeric.SAMPLED, qwen_numeric.greedy
# the single-host numeric tests' fixtures, reused by name; they build on `ckpt` (below: this module's tiny_ckpt)
prompts, hf_model = qwen_numeric.prompts, qwen_numeric.hf_model
reference, teacher_forced = qwen_numeric.reference, qwen_numeric.teacher_forced


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Path:
    """The checkpoint of the fixtures imported from test_qwen_text_numeric (prompts, hf_model, reference)."""
    return tiny_ckpt


def run_ranks_on_hosts(net: Network, servers: Servers, plan: dict[str, Any], work: Path,
                       rank_hosts: list[str]) -> dict[str, tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
    """One ``qwen_text_harness.py`` process per rank, rank r on host ``rank_hosts[r]``; waits, with one deadline,
    until all have exited or one has failed (its peers would only wait out the group timeout; leftovers are stopped
    at test teardown with the other processes of ``servers``). Returns {layout: (output rank's arrays, per-rank
    reports)}, as test_qwen_text_numeric's ``launch``."""
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = child_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    TRANSFORMERS_VERBOSITY="error")
    env.pop("GLOO_SOCKET_IFNAME", None)  # each rank binds its own address's interface (bind_collectives)
    procs = []
    for rank, host in enumerate(rank_hosts):
        proc = NetnsProc(net, host, [str(HARNESS), "--plan", str(plan_file), "--out", str(work)], REPO,
                         f"qwen-rank{rank}-{host}", work, dict(env, RANK=str(rank)))
        servers.procs.append(proc)
        procs.append(proc)

    def tails() -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-3000:]}" for p in procs)

    def settled() -> bool:
        codes = [proc.popen.poll() for proc in procs]
        return None not in codes or any(code not in (None, 0) for code in codes)

    try:
        wait_until(settled, LOGIT_TIMEOUT_S, "the rank processes to finish", interval_s=0.2)
    except TimeoutError:
        pytest.fail(f"ranks did not finish within {LOGIT_TIMEOUT_S:.0f}s:\n{tails()}")
    codes = [proc.popen.poll() for proc in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}:\n{tails()}"
    return load_runs(work, plan)


def test_qwen_text_logits_tp_and_pp_across_hosts_match_unsharded_hf(
        net: Network, servers: Servers, ckpt: Path, prompts: dict[str, Any], reference: Any, teacher_forced: Any,
        tmp_path: Path) -> None:
    """Tiny Qwen2.5 text, rank 0 on h1 and rank 1 on h2, rendezvous at h1's address: TP 2 (the attention and
    MLP all-reduces and the vocabulary all-gather cross hosts) and PP 2 with a stage per host (the activations
    cross hosts, and the output rank is on h2). The output rank's per-step logits, alone and batched (left
    padding), and along a seeded sampled path (vs the HF model teacher-forced), are the unsharded Hugging Face
    model's within ``ATOL``; each rank's gloo sockets are on its own host's address and connect to the other's."""
    arrays = {name: ids[0].numpy().astype(np.int64) for name, ids in prompts.items()}
    np.savez(tmp_path / "inputs.npz", **arrays)

    def inst(prompt: str, sampling: list[float]) -> dict[str, Any]:
        return {"prompt": prompt, "sampling": sampling}

    greedy_cases = {"hello": [("hello", 6)], "batch": [("hello", 6), ("hi", 4), ("fox", 5)]}
    addresses = [net.ip(h) for h in LOGIT_RANK_HOSTS]
    store_ports = {name: net.port() for name in LOGIT_LAYOUTS}  # the rendezvous at h1, one per layout
    plan = {
        "inputs": str(tmp_path / "inputs.npz"),
        "scenarios": [*({"name": name, "instances": [inst(p, greedy(n)) for p, n in cases]}
                        for name, cases in greedy_cases.items()),
                      {"name": "sample", "instances": [inst("hi", SAMPLED)]}],
        "layouts": [{"name": name, "world": 2, "stage_size": stages, "ckpt": str(ckpt), "port": store_ports[name],
                     "master_addr": addresses[0], "rank_hosts": addresses}
                    for name, stages in LOGIT_LAYOUTS.items()],
    }
    t0 = time.perf_counter()
    runs = run_ranks_on_hosts(net, servers, plan, tmp_path, LOGIT_RANK_HOSTS)
    ranks_s = time.perf_counter() - t0
    worst: dict[str, float] = {}
    for layout, stages in LOGIT_LAYOUTS.items():
        res, reports = runs[layout]
        # the layout really is spread: one rank per host, TP 2 on one stage, or one stage per host
        assert [(r["stage"], r["tp_rank"]) for r in reports] == ([(0, 0), (0, 1)] if stages == 1 else
                                                                  [(0, 0), (1, 0)]), reports
        for name, cases in greedy_cases.items():
            for i, (prompt, n) in enumerate(cases):
                ref_tokens, ref_logits = reference(prompt, n)
                tokens, logits = res[f"{name}/{i}/tokens"].tolist(), res[f"{name}/{i}/logits"]
                assert tokens == ref_tokens, f"{layout} {name}[{i}]: tokens {tokens} != reference {ref_tokens}"
                assert logits.shape == ref_logits.shape, (layout, name, i, logits.shape, ref_logits.shape)
                diff = float(np.abs(logits - ref_logits).max())
                worst[layout] = max(worst.get(layout, 0.0), diff)
                assert diff < ATOL, f"{layout} {name}[{i}]: max |logit diff| {diff:.3g} vs unsharded HF"
        sampled = res["sample/0/tokens"].tolist()
        assert len(sampled) == SAMPLED[0], sampled
        diff = float(np.abs(res["sample/0/logits"] - teacher_forced("hi", sampled, len(sampled))).max())
        worst[layout] = max(worst[layout], diff)
        assert diff < ATOL, f"{layout} sampled path: max |logit diff| {diff:.3g} vs teacher-forced HF"

        # the collectives crossed hosts: gloo bound to the interface of the rank's own address (eth0, as an
        # Agent binds it), every connection of the rank is on that address, and a gloo pair (a connection to
        # the other host off the rendezvous store's port) joins the two hosts
        for rank, rep in enumerate(reports):
            own, other = addresses[rank], addresses[1 - rank]
            col = rep["collectives"]
            assert (col["host"], col["iface"], col["GLOO_SOCKET_IFNAME"]) == (own, "eth0", "eth0"), col
            conns = [(tuple(local), tuple(remote)) for local, remote in col["connections"]]
            assert conns and {local[0] for local, _ in conns} == {own}, (layout, rank, conns)
            pairs = [c for c in conns if c[1][0] == other and store_ports[layout] not in (c[0][1], c[1][1])]
            assert pairs, (layout, rank, conns)
    print(f"\nrank processes on two hosts: {ranks_s:.1f}s wall; max |logit diff| vs unsharded HF: "
          + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
