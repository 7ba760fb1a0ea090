"""`g amqp-worker`: run a worker until SIGTERM/SIGINT or a liveness failure."""

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any

from guillotina.commands import Command

from guillotina_amqp import metrics
from guillotina_amqp.connection import CONNECTION_ERRORS
from guillotina_amqp.exceptions import AMQPError, InvalidSettings, StateManagerUnavailable
from guillotina_amqp.liveness import (  # noqa: F401 - the exit codes, re-exported
    EXIT_BEACON_LOST,
    EXIT_IDLE,
    EXIT_LOOP_BLOCKED,
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    LoopWatchdog,
)
from guillotina_amqp.names import DEFAULT_QUEUE, check_queue_name
from guillotina_amqp.settings import AMQPSettings, get_settings, read_top_level
from guillotina_amqp.state import redis_client
from guillotina_amqp.state.redis_pipe import RedisPipe
from guillotina_amqp.terminal import escape_log_output
from guillotina_amqp.worker import Worker

logger = logging.getLogger("guillotina_amqp")

#: port of the metrics server when neither --port nor the configuration's `port` says
DEFAULT_METRICS_PORT = 8080
#: seconds a worker that failed a liveness check gets to close before it is killed
FAILED_STOP_TIMEOUT = 10
#: What stops a worker before it starts: bad settings, or a broker it cannot reach.
_STARTUP_ERRORS: tuple[type[Exception], ...] = (AMQPError, *CONNECTION_ERRORS)


#: Recycling and load (docs/operations.md#recycling-and-load): flag, type (a value above 0), help.
RECYCLING_FLAGS = (
    ("--max-tasks", int, "claim at most this many tasks, finish them, give back the rest and exit 0"),
    (
        "--max-run-time",
        float,
        "seconds after which the worker shuts down gracefully and exits 0 (to be restarted)",
    ),
    ("--max-load", float, "take no tasks while the 1-minute load average is above this; resume below it"),
)


class WorkerCommand(Command):
    description = "Run a guillotina_amqp worker consuming the amqp.queue (or the --queue ones)"

    exit_code = EXIT_OK

    def get_parser(self) -> argparse.ArgumentParser:
        parser = super().get_parser()
        parser.add_argument(
            "--auto-kill-timeout",
            type=float,
            default=None,
            help=(
                "seconds the event loop may stay blocked (e.g. by a task calling time.sleep) before "
                f"the process is killed with exit code {EXIT_LOOP_BLOCKED}; off by default"
            ),
        )
        parser.add_argument(
            "--max-running-tasks",
            type=int,
            default=None,
            help="tasks run at once (and prefetched); overrides amqp.max_running_tasks",
        )
        for flag, kind, text in RECYCLING_FLAGS:
            parser.add_argument(flag, type=_positive(kind), default=None, help=text)
        parser.add_argument(
            "--queue",
            action="append",
            default=[],
            type=_queue_name,
            dest="queues",
            help="consume this named queue instead of amqp.queue (repeatable; 'default' names amqp.queue)",
        )
        parser.add_argument("--metrics-server", action="store_true", help="serve Prometheus /metrics")
        parser.add_argument(
            "--port",
            type=int,
            default=None,
            help=f"metrics server port (default: the configuration's port, else {DEFAULT_METRICS_PORT})",
        )
        return parser

    def run_command(self, settings: Any = None, loop: Any = None) -> None:
        super().run_command(settings=settings, loop=loop)
        sys.exit(self.exit_code)

    def make_app(self, settings: dict) -> Any:
        """Guillotina's app, without hashing `root_user.password` (argon2, ≈ 0.6 s of every
        start on a 2-core VM): a worker serves no Guillotina API, so nobody logs in as root
        here. Tasks still run as root when scheduled by root (the user object stays)."""
        root_user = {**(settings.get("root_user") or {}), "password": None}
        return super().make_app({**settings, "root_user": root_user})

    async def run(self, arguments: argparse.Namespace, settings: dict, app: Any) -> None:
        # the worker logs what messages say (ids, functions, refusal reasons) to a terminal
        escape_log_output()
        try:
            if arguments.metrics_server:
                _serve_metrics(metrics_port(arguments.port))
            worker = Worker(  # reads and checks the settings
                max_size=arguments.max_running_tasks,
                queues=arguments.queues,
                max_tasks=arguments.max_tasks,
                max_load=arguments.max_load,
            )
            await _check_state_store(worker.settings)
            await worker.start()
        except _STARTUP_ERRORS as exc:
            logger.error("amqp-worker could not start: %s", _describe(exc))
            self.exit_code = EXIT_STARTUP_FAILED
            return
        watchdog = None
        if arguments.auto_kill_timeout:
            watchdog = LoopWatchdog(arguments.auto_kill_timeout)
            watchdog.start()
        try:
            self.exit_code = await serve(worker, arguments.max_run_time)
        finally:
            if watchdog is not None:
                watchdog.stop()


def _positive(kind: type) -> Any:
    """An argparse type: a number of `kind` above 0 (a clear usage error otherwise)."""

    def read(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} above 0, not {text!r}")
        return value

    return read


async def serve(worker: Worker, max_run_time: float | None = None) -> int:
    """Run `worker` until a signal (graceful shutdown, exit 0) or a failed liveness check.

    Recycling (docs/operations.md) shuts down gracefully too, exit 0: once the worker ran its
    --max-tasks, or after `max_run_time` seconds.
    """
    loop = asyncio.get_running_loop()
    signaled = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if signaled.is_set():
            logger.warning("Worker %s got %s again: canceling running tasks now", worker.worker_id, sig.name)
            worker.cancel_running()
            return
        logger.info("Worker %s got %s: shutting down", worker.worker_id, sig.name)
        signaled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await _first(
            signaled.wait(), worker.failed.wait(), worker.recycled.wait(), _run_time(worker, max_run_time)
        )
        if not worker.failed.is_set():
            shutdown = asyncio.ensure_future(worker.shutdown())
            await _first(shutdown, worker.failed.wait())
            if shutdown.done():
                shutdown.result()
                return EXIT_OK
            shutdown.cancel()
        await _stop_failed(worker)
        return worker.exit_code or EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _run_time(worker: Worker, seconds: float | None) -> None:
    """Return after `seconds` (--max-run-time); never without it."""
    if seconds is None:
        await asyncio.Event().wait()
        return
    await asyncio.sleep(seconds)
    logger.info("Worker %s ran for %gs (--max-run-time): recycling", worker.worker_id, seconds)


async def _first(*aws: Any) -> None:
    """Wait until the first of `aws` is done; cancel the others unless they are tasks we keep."""
    futures = [asyncio.ensure_future(aw) for aw in aws]
    _, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        if future not in aws:
            future.cancel()


async def _stop_failed(worker: Worker) -> None:
    """Close a worker that is not live; its connection may be stuck, so do not wait forever."""
    # whatever hangs from here on (closing, the application's shutdown), the process ends
    killer = threading.Timer(3 * FAILED_STOP_TIMEOUT, os._exit, (worker.exit_code or EXIT_STARTUP_FAILED,))
    killer.daemon = True
    killer.start()
    try:
        await asyncio.wait_for(worker.stop(), FAILED_STOP_TIMEOUT)
    except Exception as exc:
        logger.error("Worker %s did not stop cleanly (%r); exiting anyway", worker.worker_id, exc)


def _queue_name(value: str) -> str:
    """--queue's value, checked: argparse shows the problem and exits 2."""
    if value == DEFAULT_QUEUE:
        return value
    try:
        return check_queue_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def metrics_port(flag: int | None) -> int:
    """`--port`, else the configuration's top-level `port` (as the original plugin did), else 8080."""
    if flag is not None:
        return flag
    port: int = read_top_level("port", int, DEFAULT_METRICS_PORT)
    return port


def _serve_metrics(port: int) -> None:
    try:
        metrics.start_server(port)
    except OSError as exc:  # not the broker's fault: name the port, not RabbitMQ
        raise InvalidSettings(
            f"cannot serve metrics on port {port} (--port, or the configuration's port): {exc!r}"
        ) from None


async def _check_state_store(settings: AMQPSettings) -> None:
    """Fail at start, naming the setting to fix, rather than on every message: a server that
    cannot be reached, refuses our credentials or our TLS (never retried: they stay wrong)."""
    if settings.persistent_manager != "redis":
        return
    if not redis_client.uses_sentinel():
        redis_client.check_configured()
    # the client and the pipelined connection the state manager uses, each logged in once
    client = redis_client.probe_client(timeout=10)
    try:
        await client.ping()
        pipe = await RedisPipe.open(client)
        try:
            await pipe.call("PING")
        finally:
            pipe.close()
    except Exception as exc:
        raise StateManagerUnavailable(redis_client.describe_failure(exc)) from None
    finally:
        await client.aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AMQPError):
        return str(exc)
    if isinstance(exc, CONNECTION_ERRORS):
        amqp = get_settings()
        return f"cannot reach RabbitMQ at {amqp.host}:{amqp.port} (amqp.host/amqp.port): {exc!r}"
    return str(exc)
