"""Real `g amqp-worker` processes for tests that need a process to start, die or exit."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from guillotina import app_settings

from tests.utils import wait_for

ROOT = Path(__file__).resolve().parent.parent
G = Path(sys.executable).parent / "g"


def worker_config(**amqp: Any) -> dict:
    """Settings for a worker process sharing this test's queues, Redis prefix and database."""
    databases = app_settings.get("databases") or {}
    config: dict[str, Any] = {
        "applications": ["guillotina_amqp", "guillotina.contrib.redis", "tests.app"],
        "databases": _portable(databases),
        "root_user": {"password": "admin"},
        "jwt": {"secret": "foobar", "algorithm": "HS256"},
        "amqp": {**app_settings["amqp"], **amqp},
        # where the state lives and how to log in there (guillotina's pool sizes stay its own)
        "redis": {k: v for k, v in app_settings["redis"].items() if k not in ("pool", "cluster_mode")},
        "redis_prefix_key": app_settings["redis_prefix_key"],
        "logging": {
            "version": 1,
            # our loggers exist before guillotina applies this: keep them enabled
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"handlers": ["console"], "level": "INFO"},
        },
    }
    return config


def environment(config: dict) -> dict[str, str]:
    """`config` as the `G_...` variables of a container deployment (guillotina reads them).

    The `amqp` block becomes one variable per setting, as text (`G_AMQP__PORT=5672`), to
    exercise reading them back as their types; other blocks are given whole, as JSON.
    """
    env = {f"G_{key.upper()}": env_text(value) for key, value in config.items() if key != "amqp"}
    for name, value in config.get("amqp", {}).items():
        env[f"G_AMQP__{name.upper()}"] = env_text(value)
    return env


def env_text(value: Any) -> str:
    """A setting's value as an operator writes it in an environment variable."""
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def _portable(databases: Any) -> dict:
    """The test's databases as a worker process can open them (DUMMY only lives in-process)."""
    if isinstance(databases, list):
        databases = {k: v for item in databases for k, v in item.items()}
    found = {}
    for name, db in databases.items():
        if db.get("storage") == "postgresql":
            found[name] = db
    return found or {"db": {"storage": "DUMMY_FILE", "filename": tempfile.mktemp(suffix=".db")}}


class WorkerProcess:
    """`g amqp-worker -c <config>` in a subprocess, its output kept in a log file.

    With `config=None` there is no configuration file: guillotina's defaults and the
    `G_...` environment variables in `env` are all the worker gets.
    """

    def __init__(self, config: dict | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.extra_env = env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="amqp-worker-"))
        self.config_args: list[str] = []
        if config is not None:
            config_path = self.dir / "config.yaml"
            config_path.write_text(yaml.safe_dump(config))
            self.config_args = ["-c", str(config_path)]
        self.log_path = self.dir / "worker.log"
        self.args = args
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(G), "amqp-worker", *self.config_args, *self.args],
                cwd=self.dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    async def wait_consuming(self, timeout: float = 60) -> None:
        """Until the worker logs that it consumes (fails early if it exits first)."""

        def consuming() -> bool:
            if self.returncode is not None:
                raise AssertionError(f"worker exited with {self.returncode}:\n{self.output}")
            return "consuming" in self.output

        await wait_for(consuming, timeout, "the worker to consume")

    async def wait_exit(self, timeout: float = 60) -> int:
        """The exit code, once the process has ended."""
        await wait_for(lambda: self.returncode is not None, timeout, f"the worker to exit:\n{self.output}")
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        deadline = time.monotonic() + 10
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    async def __aenter__(self) -> "WorkerProcess":
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()
        await asyncio.sleep(0)
