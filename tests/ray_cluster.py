"""A two-node Ray cluster for tests, inside a private network namespace that has only ``lo``
(``ip netns add``), so nothing of it listens beyond loopback: ``ray start --head`` + ``ray start
--address``, 1 CPU each; drivers run in the namespace through :meth:`Cluster.run`. The namespace
and every process in it are removed at the end (by pid, from ``ip netns pids``).

Ports: ``ray start`` refuses a port that a Ray process anywhere on the machine (any namespace)
still uses, and a previous module's cluster may still be shutting down, so every test module
gets its own offset, and every xdist worker its own block of 20 ports."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
PORT = 6391
# port offsets inside each xdist worker's block of 20, per test module
PORT_OFFSETS = {"test_executor": 0, "test_executor_pipeline": 7, "test_tuning_ray": 11, "test_obs_ray": 14}


def _sh(*cmd: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)


class Cluster:
    def __init__(self, ns: str, env: dict, port: int):
        self.ns, self.env, self.port, self.address = ns, env, port, f"127.0.0.1:{port}"

    def run(self, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", self.ns, *map(str, cmd), env=self.env, timeout=timeout)


def netns_cluster(request):
    """Generator for a module-scoped fixture: yields a running :class:`Cluster`."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a loopback-only network namespace")
    mod = request.module.__name__.rsplit(".", 1)[-1]
    offset = PORT_OFFSETS[mod]
    ns = f"cmpray{os.getpid()}m{offset}"
    if _sh("ip", "netns", "add", ns).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    c = Cluster(ns, env, PORT + 20 * worker + offset)
    try:
        assert _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up").returncode == 0
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(200 * 2**20),
                  "--disable-usage-stats"]
        r = c.run(VENV_BIN / "ray", "start", "--head", "--port", str(c.port), "--include-dashboard", "false", *common)
        assert r.returncode == 0, r.stderr[-2000:]
        r = c.run(VENV_BIN / "ray", "start", "--address", c.address, *common)
        assert r.returncode == 0, r.stderr[-2000:]
        # nothing of the cluster may listen outside the namespace's loopback
        listen = c.run("ss", "-ltnH").stdout.split("\n")
        assert all(not l.split() or l.split()[3].rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "*", "[::1]", "[::]")
                   for l in listen)
        assert [l.split(": ")[1] for l in c.run("ip", "-o", "link").stdout.splitlines()] == ["lo"]
        yield c
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for p in _sh("ip", "netns", "pids", ns).stdout.split()]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 5
            while pids and time.time() < deadline and _sh("ip", "netns", "pids", ns).stdout.strip():
                time.sleep(0.2)
        _sh("ip", "netns", "del", ns)
