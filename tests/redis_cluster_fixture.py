"""A real Redis Cluster for the tests: three primaries (no replicas) on free 127.0.0.1 ports.

Each node is a private ``redis-server --cluster-enabled yes`` (see ``RedisServer``) in its own
directory; ``redis-cli --cluster create`` joins them and assigns the 16384 slots, and ``start()``
returns once every node reports ``cluster_state:ok``. Both binaries are required: without them
the tests fail with a message saying so, they are not skipped.

``running_cluster`` is the body of a fixture: a module-scoped shared cluster (emptied with
``flushall()`` before each test), and a separate one for tests that crash nodes or move slots.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.errors import EmbeddedRedisError
from service.store.launcher import find_redis_server
from tests.redis_fixture import START_TIMEOUT_S, RedisServer

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # a node's cluster bus listens on its port + 10000
# Ports below the usual ephemeral range (32768-60999), so that neither a node's port nor its bus
# port is likely to be taken by an outgoing connection between the check and the bind.
PORT_RANGE = (10000, 22000)


def find_redis_cli() -> str:
    """``redis-cli`` on PATH or next to the redis-server in use; a clear failure when there is none."""
    try:
        server = find_redis_server()
    except EmbeddedRedisError as e:
        pytest.fail(f"the Redis Cluster tests need redis-server and redis-cli: {e}", pytrace=False)
    found = shutil.which("redis-cli") or shutil.which("redis-cli", path=str(Path(server).parent))
    if not found:
        pytest.fail(
            "the Redis Cluster tests need redis-cli (it creates the cluster), next to redis-server or on "
            "PATH: install Redis (e.g. `apt-get install redis-server`, `brew install redis`)",
            pytrace=False,
        )
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_ports(n: int) -> list[int]:
    """``n`` ports P, each with P and its bus port P + 10000 free, no two clashing."""
    ports: list[int] = []
    for _ in range(10_000):
        p = random.randint(*PORT_RANGE)
        taken = {q for port in ports for q in (port, port + BUS_PORT_OFFSET)}
        if {p, p + BUS_PORT_OFFSET} & taken or not (_bindable(p) and _bindable(p + BUS_PORT_OFFSET)):
            continue
        ports.append(p)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"found no {n} free port pairs in {PORT_RANGE}")


class RedisClusterServers:
    """``start()``, ``stop()``; ``nodes`` are ``RedisServer``s (each can be stopped and restarted)."""

    def __init__(self, directory: Path, *, primaries: int = 3, appendonly: bool = False) -> None:
        self.directory = Path(directory)
        self.redis_cli = find_redis_cli()
        self.nodes = [
            RedisServer(
                self.directory / f"node{i}",
                port=port,
                appendonly=appendonly,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.directory / f"node{i}" / "nodes.conf"),
                ],
            )
            for i, port in enumerate(free_node_ports(primaries))
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        atexit.register(self.stop)
        try:
            for node in self.nodes:
                node.start()
            args = [
                self.redis_cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ]
            out = subprocess.run(
                args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for node in self.nodes:
            node.stop()

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node says ``cluster_state:ok``, with all slots assigned and every node known."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = []
            for node in self.nodes:
                try:
                    infos.append(self.cluster_info(node))
                except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                    infos.append({"error": repr(e)})
            if all(
                i.get("cluster_state") == "ok"
                and i.get("cluster_slots_assigned") == str(SLOTS)
                and i.get("cluster_known_nodes") == str(len(self.nodes))
                for i in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster is not ok after {timeout_s:g} s: {infos}")
            time.sleep(0.05)

    @staticmethod
    def raw_reply(node: RedisServer, *command: str) -> str:
        """A ``CLUSTER ...`` reply as the server sent it (redis-py would parse it, differently by version)."""
        with node.client() as c:
            c.set_response_callback(command[0], lambda response, **options: response)
            raw = c.execute_command(*command)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    @classmethod
    def cluster_info(cls, node: RedisServer) -> dict[str, str]:
        text = cls.raw_reply(node, "CLUSTER INFO")
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def slot_owners(self) -> dict[int, int]:
        """Slot -> port of the primary serving it, from ``CLUSTER NODES`` of the first node."""
        text = self.raw_reply(self.nodes[0], "CLUSTER NODES")
        owners: dict[int, int] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8 or "master" not in parts[2].split(","):
                continue
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for r in parts[8:]:
                if r.startswith("["):  # a slot being migrated or imported
                    continue
                lo, _, hi = r.partition("-")
                for slot in range(int(lo), int(hi or lo) + 1):
                    owners[slot] = port
        return owners

    def keyslot(self, key: str) -> int:
        with self.nodes[0].client() as c:
            return int(c.execute_command("CLUSTER KEYSLOT", key))

    def node_of(self, key: str) -> RedisServer:
        """The primary that holds ``key`` (by ``CLUSTER KEYSLOT`` and ``CLUSTER NODES``)."""
        port = self.slot_owners()[self.keyslot(key)]
        return next(n for n in self.nodes if n.port == port)

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                c.flushall()


@contextlib.contextmanager
def running_cluster(directory: Path, **options: Any) -> Iterator[RedisClusterServers]:
    """A started cluster (``RedisClusterServers`` options), stopped on exit: the body of a fixture."""
    cluster = RedisClusterServers(directory, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
