"""A redis-server of a test's own, that it may stop, restart or kill without disturbing others.

Loaded as a pytest plugin (conftest): tests mark themselves with OWN_REDIS and ask
for the `own_redis` fixture. It keeps its data across restarts (append-only file).
"""

import contextlib
import socket
import subprocess
import time
from typing import Iterator

import pytest
from redis.asyncio import Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OWN_REDIS_PORT = free_port()
#: point guillotina's redis settings at the test's own server
OWN_REDIS = pytest.mark.app_settings({"redis": {"host": "127.0.0.1", "port": OWN_REDIS_PORT}})


class OwnRedis:
    def __init__(self, port: int, directory: str) -> None:
        self.port = port
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.directory],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            assert time.monotonic() < deadline and self.process.poll() is None, (
                "own redis-server did not start"
            )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    server = OwnRedis(OWN_REDIS_PORT, str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()
