"""Runtime settings of Main, its Workers and the Agent startup process (pydantic, units in names). The only
module reading env vars.

Every field can be set with an environment variable ``SERVABLE_<FIELD>`` (e.g. ``SERVABLE_HEARTBEAT_TIMEOUT_S=3``)
or in code with `servable_framework.server.set_settings(...)` before ``start_servables``. ``agent_threads`` is read
by the Agent startup process (``startup_agents``, e.g. ``serving_agent.py``) from its own environment.
API keys (``api_key_file``, ``api_keys``) come from a file or the environment, never from a command line that
``ps`` shows; see `servable_framework.main.auth`.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    heartbeat_interval_s: float = Field(1.0, gt=0, description="ping period, Main<->Worker and Worker<->Agent")
    heartbeat_timeout_s: float = Field(3.0, gt=0, description="silence after which a peer counts as dead")
    request_timeout_s: float = Field(100.0, gt=0, description="default per-request deadline (REST and ZMQ)")
    step_timeout_s: float = Field(30.0, gt=0, description="an Agent whose running batch makes no step for this long "
                                  "(a peer rank hung or died inside a collective) fails it and makes the group "
                                  "re-form, well before the 120 s torch.distributed timeout")
    group_timeout_s: float = Field(120.0, gt=0, description="torch.distributed timeout of the Agents' rendezvous "
                                   "and collectives (sent to every Agent in its config)")
    cancel_abandoned: bool = Field(True, description="a request past its deadline, or whose REST client hung up, is "
                                   "stopped in the Worker and on the Agents (else it runs on for nobody)")
    max_enqueued_requests: int = Field(10000, ge=1, description="requests admitted at once; above: 503")
    max_instances_per_request: int = Field(1024, ge=1)
    worker_restart_max: int = Field(3, ge=0, description="restarts of a dead Worker before giving up")
    restart_reset_s: float = Field(600.0, gt=0, description="a Worker (or an Agent) that ran this long since its "
                                   "last (re)start gets its whole restart budget back when it dies: the budget "
                                   "stops crash loops, not a process that fails once a day")
    worker_start_timeout_s: float = Field(600.0, gt=0, description="deadline for a local Worker to register")
    graceful_timeout_s: float = Field(10.0, ge=0, description="drain period on SIGTERM, and SIGTERM->SIGKILL wait")
    log_dir: str = Field("serving_logs", description="Worker logs, relative to the CWD")
    api_key_file: str | None = Field(None, description="REST API keys, one per line (blank lines and lines "
                                     "starting with # skipped): with any key configured, every REST route but "
                                     "/health and /ready needs 'Authorization: Bearer <key>' (env "
                                     "SERVABLE_API_KEY_FILE)")
    api_keys: SecretStr | None = Field(None, description="REST API keys, comma-separated (env SERVABLE_API_KEYS); "
                                       "added to those of api_key_file")
    agent_standby: bool = Field(True, description="the Agent startup process keeps one pre-started Agent "
                                "interpreter per local rank (torch and the shard's module imported, no weights, "
                                "~350 MB each on CPU) that replaces a dead rank in well under a second instead of "
                                "the 2-5 s a fresh one needs; 0 saves that memory")
    keep_freed_mib: int = Field(512, ge=0, description="Main and its Workers keep up to this much freed memory "
                                "mapped for reuse (glibc malloc tuning, `servable_framework.memtune`), so a large "
                                "tensor does not page-fault in every process it crosses; 0 keeps glibc's defaults")
    shared_memory: bool = Field(True, description="a ZMQ Client on this host may pass large tensors (1 MiB and up) "
                                "through shared memory under /dev/shm instead of the sockets "
                                "(`servable_framework.shm`); False refuses them and the Client sends them inline")
    http_direct: bool = Field(True, description="Main's HTTP protocol answers a plain MindSpore predict itself, "
                              "without an ASGI cycle (`servable_framework.main.fast_http`: same answers, less CPU "
                              "per request); False sends every request through uvicorn's stock httptools protocol "
                              "and the ASGI app (the way back should a uvicorn release change what it builds on)")
    forward_requests: bool = Field(True, description="a MindSpore REST body up to 16 KiB, or a ZMQ Client's "
                                   "instances, go to the Worker as they came when their endpoint has one READY "
                                   "Worker: it decodes, checks, runs and renders them (same answers, less CPU in "
                                   "Main); False decodes every request in Main (the way back)")
    busy_poll_us: int = Field(1000, ge=0, le=100_000, description="while a single request is in flight, Main "
                              "polls for its Worker's answer for up to this long instead of sleeping, when that "
                              "Worker's last answer to the method came within it (`servable_framework.busy_poll`: "
                              "c=1 latency -20 % on a VM, at the cost of a CPU kept busy meanwhile); 0 turns it off")
    agent_threads: int = Field(0, ge=0, description="torch intra-op threads of each Agent; 0 (default) shares this "
                               "host's cores among its local Agents: usable cores // local Agents, at least 1")

    @model_validator(mode="after")
    def _timeout_above_interval(self) -> Settings:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be greater than heartbeat_interval_s")
        if self.step_timeout_s >= self.group_timeout_s:  # the step watch must fire before torch's own timeout
            raise ValueError("step_timeout_s must be less than group_timeout_s")
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {}
        for name in cls.model_fields:
            env = os.environ.get(f"SERVABLE_{name.upper()}")
            if env is not None:
                values[name] = env
        values.update(overrides)
        return cls.model_validate(values)

    def agent_thread_count(self, local_agents: int) -> int:
        """Intra-op threads for each of ``local_agents`` Agents started together on this host."""
        if self.agent_threads:
            return self.agent_threads
        return max(1, usable_cores() // max(1, local_agents))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1
