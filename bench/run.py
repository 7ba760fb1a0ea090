"""Throughput and latency of guillotina_amqp next to what RabbitMQ itself carries.

    make bench                       # or: .venv/bin/python bench/run.py [--help]

One run measures, on the local RabbitMQ and Redis (RABBITMQ / REDIS = host:port):

  (a) the broker limit: a bare aioamqp consumer (persistent messages, prefetch =
      concurrency, one Redis call per message, ack after it), its publisher with
      confirms, and a bare publish -> consume -> ack round trip;
  (b) `g amqp-worker` draining tasks queued before it started (redis and memory state);
  (c) tasks sleeping 50 ms at concurrency 20 (ideal: 400/s);
  (d) sequential add_task -> join() round trips on a warm worker;
  (e) add_task enqueue rate, sequential and with concurrent callers.

and prints a table (ratios to the bare figures beside) and writes bench/results.json.
Every run uses its own exchange, queues and Redis prefix and deletes them at the end.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aioamqp  # noqa: E402
import yaml  # noqa: E402
from guillotina import app_settings  # noqa: E402
from guillotina.factory import make_app  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from guillotina_amqp.connection import settle_multiple_confirms  # noqa: E402

G = Path(sys.executable).parent / "g"
WORKER_LOG_FORMAT = "%(created).6f %(levelname)s %(name)s %(message)s"


def hostport(name: str, default: str) -> tuple[str, int]:
    host, _, port = os.environ.get(name, default).partition(":")
    return host, int(port)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Bench:
    """The names, connections and settings of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ns = f"bench-{uuid.uuid4().hex[:10]}"
        self.prefix = f"{self.ns}-"
        self.amqp_host, self.amqp_port = hostport("RABBITMQ", "127.0.0.1:5672")
        self.redis_host, self.redis_port = hostport("REDIS", "127.0.0.1:6379")
        self.queues: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="amqp-bench-"))
        self.redis = Redis(host=self.redis_host, port=self.redis_port)
        self.app: Any = None

    # -- settings ---------------------------------------------------------
    def amqp(self, queue: str, manager: str) -> dict:
        if queue not in self.queues:
            self.queues.append(queue)
        return {
            "host": self.amqp_host,
            "port": self.amqp_port,
            "exchange": self.ns,
            "queue": queue,
            "persistent_manager": manager,
            "max_running_tasks": self.args.concurrency,
        }

    def app_config(self, queue: str, manager: str) -> dict:
        return {
            "applications": ["guillotina_amqp", "guillotina.contrib.redis", "bench.tasks"],
            "databases": {},
            "root_user": {"password": "admin"},
            "jwt": {"secret": uuid.uuid4().hex, "algorithm": "HS256"},
            "amqp": self.amqp(queue, manager),
            "redis": {"host": self.redis_host, "port": self.redis_port},
            "redis_prefix_key": self.prefix,
        }

    def use(self, queue: str, manager: str) -> None:
        """Point this process's add_task at `queue` with `manager` state."""
        app_settings["amqp"] = self.amqp(queue, manager)

    async def start_app(self) -> None:
        self.app = make_app(
            settings=self.app_config(f"{self.ns}-e", "redis"), loop=asyncio.get_running_loop()
        )
        await self.app.startup()

    # -- the worker process ---------------------------------------------------
    @contextlib.asynccontextmanager
    async def worker(self, queue: str, manager: str):
        config = self.app_config(queue, manager)
        config["logging"] = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": WORKER_LOG_FORMAT}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"handlers": ["console"], "level": "INFO"},
        }
        path = self.tmp / f"{queue}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = self.tmp / f"{queue}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            spawned = time.time()
            process = subprocess.Popen(
                [str(G), "amqp-worker", "-c", str(path), *self.args.worker_args],
                cwd=self.tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        handle = WorkerHandle(process, log, spawned)
        try:
            yield handle
        finally:
            process.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), 30)
            except asyncio.TimeoutError:
                process.kill()
                process.wait()

    # -- clean-up -------------------------------------------------------------
    async def cleanup(self) -> None:
        from guillotina_amqp import publishing
        from guillotina_amqp.state.manager import get_state_manager

        for publisher in list(publishing._publishers.values()):
            await publisher.close()
        publishing._publishers.clear()
        with contextlib.suppress(Exception):
            await get_state_manager().finalize()
        transport, protocol = await self.connect()
        channel = await protocol.channel()
        for queue in self.queues:
            for name in (queue, f"{queue}-delay", f"{queue}-error"):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await channel.exchange_delete(self.ns)
        await protocol.close()
        transport.close()
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await self.redis.unlink(*keys[start : start + 1000])
        await self.redis.aclose()
        if self.app is not None:
            with contextlib.suppress(Exception):
                await self.app.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def connect(self) -> tuple[Any, Any]:
        return await aioamqp.connect(
            host=self.amqp_host, port=self.amqp_port, login="guest", password="guest"
        )

    async def redis_cpu(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def commandstats(self) -> dict[str, int]:
        info = await self.redis.info("commandstats")
        return {key.removeprefix("cmdstat_"): value["calls"] for key, value in info.items()}


class WorkerHandle:
    def __init__(self, process: subprocess.Popen, log: Path, spawned: float) -> None:
        self.process, self.log, self.spawned = process, log, spawned

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def connected_at(self) -> float:
        """When the worker connected to RabbitMQ (its first log line saying so)."""
        for line in self.output().splitlines():
            if "Connected to RabbitMQ" in line:
                return float(line.split(" ", 1)[0])
        raise RuntimeError(f"the worker never connected:\n{self.output()}")

    def cpu(self) -> float:
        """CPU seconds the worker process used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def cpu_once_connected(self) -> float:
        while "Connected to RabbitMQ" not in self.output():
            await asyncio.sleep(0.005)
        return self.cpu()

    async def wait_consuming(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "consuming" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.output()}")
            await asyncio.sleep(0.02)


class Ended:
    """Counts tasks whose state changed to something other than `running`, over pub/sub."""

    def __init__(self, bench: Bench, expected: set[str]) -> None:
        self.bench, self.expected = bench, expected
        self.ended: set[str] = set()
        self.last = 0.0
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Ended":
        self.task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _listen(self) -> None:
        from guillotina_amqp import names

        channel_prefix = names.done_channel(self.bench.prefix, "")
        async with self.bench.redis.pubsub() as pubsub:
            await pubsub.psubscribe(names.done_channel(self.bench.prefix, "*"))
            self.ready.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is None or message["data"] == b"running":
                    continue
                task_id = message["channel"].decode()[len(channel_prefix) :]
                if task_id in self.expected and task_id not in self.ended:
                    self.ended.add(task_id)
                    self.last = time.time()
                    if len(self.ended) == len(self.expected):
                        self.done.set()


async def all_finished(task_ids: list[str], timeout: float) -> float:
    """Wait until every task's state reads `finished`; the time that was first seen."""
    from guillotina_amqp.state.manager import get_state_manager

    manager = get_state_manager()
    deadline = time.monotonic() + timeout
    pending = list(task_ids)
    while True:
        states = await gather_limited([lambda t=t: manager.get(t) for t in pending], 100)
        pending = [t for t, s in zip(pending, states) if s.get("status") != "finished"]
        if not pending:
            return time.time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} tasks not finished, e.g. {pending[0]}: {states[0]}")
        await asyncio.sleep(0.2)


async def gather_limited(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run `calls` with at most `limit` in flight; results in order."""
    results: list[Any] = [None] * len(calls)
    position = iter(range(len(calls)))

    async def caller() -> None:
        for index in position:
            results[index] = await calls[index]()

    await asyncio.gather(*(caller() for _ in range(min(limit, len(calls)))))
    return results


# -- (a) the broker ---------------------------------------------------------
async def bare_broker(bench: Bench) -> dict:
    """Bare aioamqp: confirmed publishing, consuming with one Redis call per message, round trips."""
    queue, n, prefetch = f"{bench.ns}-a", bench.args.tasks, bench.args.concurrency
    bench.queues.append(queue)
    transport, protocol = await bench.connect()
    publish_channel = await protocol.channel()
    await publish_channel.confirm_select()
    settle_multiple_confirms(publish_channel)  # aioamqp alone hangs on batched confirms
    await publish_channel.exchange_declare(bench.ns, "direct", durable=True)
    await publish_channel.queue_declare(queue, durable=True)
    await publish_channel.queue_bind(queue, bench.ns, routing_key=queue)
    body = json.dumps({"func": "bench.tasks.add", "args": [1, 2], "kwargs": {}}).encode()
    properties = {"delivery_mode": 2, "content_type": "application/json"}

    async def publish() -> None:
        await publish_channel.publish(body, bench.ns, queue, properties=properties)

    started = time.perf_counter()
    await gather_limited([publish] * n, bench.args.callers)
    publish_rate = n / (time.perf_counter() - started)

    consumed = 0
    all_done = asyncio.Event()
    waiters: dict[str, asyncio.Future] = {}
    tasks: set[asyncio.Task] = set()

    async def handle(channel: Any, payload: bytes, envelope: Any, props: Any) -> None:
        nonlocal consumed
        await bench.redis.set(f"{bench.prefix}bare:{envelope.delivery_tag}", payload, ex=60)
        await channel.basic_client_ack(envelope.delivery_tag)
        consumed += 1
        waiter = waiters.pop(getattr(props, "message_id", None) or "", None)
        if waiter is not None:
            waiter.set_result(None)
        if consumed == n:
            all_done.set()

    async def on_message(channel: Any, payload: bytes, envelope: Any, props: Any) -> None:
        task = asyncio.create_task(handle(channel, payload, envelope, props))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    consume_channel = await protocol.channel()
    await consume_channel.basic_qos(prefetch_count=prefetch)
    started = time.perf_counter()
    await consume_channel.basic_consume(on_message, queue_name=queue)
    await asyncio.wait_for(all_done.wait(), 600)
    consume_rate = n / (time.perf_counter() - started)

    latencies = []
    for i in range(bench.args.roundtrips + 20):
        message_id = f"rt-{i}"
        waiter = waiters[message_id] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await publish_channel.publish(
            body, bench.ns, queue, properties={**properties, "message_id": message_id}
        )
        await waiter
        if i >= 20:  # warm-up
            latencies.append(time.perf_counter() - started)
    await protocol.close()
    transport.close()
    return {
        "consume_tasks_per_s": round(consume_rate),
        "publish_confirmed_per_s": round(publish_rate),
        "roundtrip_p50_ms": ms(percentile(latencies, 50)),
        "roundtrip_p99_ms": ms(percentile(latencies, 99)),
    }


# -- (b), (c) draining a queue filled before the worker started --------------
async def drain(bench: Bench, manager: str, label: str, func: str, args: list, n: int) -> dict:
    from guillotina_amqp import add_task

    queue = f"{bench.ns}-{label}"
    bench.use(queue, manager)
    marker = str(bench.tmp / f"{label}.done")
    extra = {"total": n, "marker": marker} if func.endswith(".add") else {}
    states = await gather_limited(
        [lambda: add_task(func, *args, **extra) for _ in range(n)], bench.args.callers
    )
    task_ids = [state.task_id for state in states]
    before = await bench.commandstats()
    redis_cpu = await bench.redis_cpu()
    async with Ended(bench, set(task_ids)) as ended, bench.worker(queue, manager) as worker:
        worker_cpu = asyncio.create_task(worker.cpu_once_connected())
        if manager == "redis":
            await asyncio.wait_for(ended.done.wait(), 600)
            end = ended.last
            after = await bench.commandstats()
            seen = await all_finished(task_ids, 60)
            end = end if seen - end < 1 else seen  # notifications missed: the slower truth
        else:
            end = await wait_file(Path(marker), 600)
            after = await bench.commandstats()
        start = worker.connected_at()
        startup = start - worker.spawned
        cpu_used = worker.cpu() - await worker_cpu
    redis_cpu = await bench.redis_cpu() - redis_cpu
    result = {
        "tasks": n,
        "tasks_per_s": round(n / (end - start), 1),
        "seconds": round(end - start, 3),
        "worker_startup_s": round(startup, 2),
        # CPU seconds of the worker and of redis-server while draining (includes the tail and
        # the verification reads; Redis also serves other clients of a shared server)
        "worker_cpu_us_per_task": round(cpu_used / n * 1e6),
        "redis_cpu_us_per_task": round(redis_cpu / n * 1e6),
    }
    if manager == "redis":
        result["redis_calls_per_task"] = per_task(before, after, n)
    return result


async def wait_file(path: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        await asyncio.sleep(0.01)
    return float(path.read_text())


def per_task(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    """Redis calls per task by command (commands run inside Lua scripts count too)."""
    delta = {cmd: after.get(cmd, 0) - before.get(cmd, 0) for cmd in after}
    return {cmd: round(calls / n, 2) for cmd, calls in sorted(delta.items()) if calls / n >= 0.01}


# -- (d) round trips ----------------------------------------------------------
async def round_trips(bench: Bench) -> dict:
    from guillotina_amqp import add_task

    queue = f"{bench.ns}-d"
    bench.use(queue, "redis")
    async with bench.worker(queue, "redis") as worker:
        await worker.wait_consuming()
        latencies = []
        for i in range(bench.args.roundtrips + 20):
            started = time.perf_counter()
            state = await add_task("bench.tasks.add", 1, 2)
            await state.join()
            if i >= 20:  # warm-up
                latencies.append(time.perf_counter() - started)
    return {"p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99))}


# -- (e) enqueue --------------------------------------------------------------
async def enqueue(bench: Bench) -> dict:
    from guillotina_amqp import add_task

    queue = f"{bench.ns}-e"
    bench.use(queue, "redis")
    await add_task("bench.tasks.add", 0, 0)  # connect and declare outside the clock
    n_seq, n_conc = bench.args.enqueue_sequential, bench.args.tasks
    before = await bench.commandstats()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_seq):
        await add_task("bench.tasks.add", 1, 2)
    sequential = n_seq / (time.perf_counter() - started)
    cpu_us = (time.process_time() - cpu) / n_seq * 1e6  # this process's: the caller's side only
    calls = per_task(before, await bench.commandstats(), n_seq)
    started = time.perf_counter()
    await gather_limited([lambda: add_task("bench.tasks.add", 1, 2)] * n_conc, bench.args.callers)
    concurrent = n_conc / (time.perf_counter() - started)
    return {
        "sequential_per_s": round(sequential),
        "sequential_cpu_us_per_call": round(cpu_us),
        "concurrent_per_s": round(concurrent),
        "callers": bench.args.callers,
        "redis_calls_per_task": calls,
    }


# -- report ---------------------------------------------------------------------
def ratio(value: float, base: float) -> str:
    return f"{value / base:.0%}" if base else "-"


def table(r: dict) -> list[tuple[str, str, str]]:
    a, e, d = r["a_broker"], r["e_enqueue"], r["d_roundtrip"]
    bare = a["consume_tasks_per_s"]
    rows = [
        ("(a) bare aioamqp consumer + 1 Redis call, tasks/s", f"{bare}", "100%"),
        ("(a) bare publish with confirms, msgs/s", f"{a['publish_confirmed_per_s']}", "100%"),
        ("(a) bare round trip p50 / p99, ms", f"{a['roundtrip_p50_ms']} / {a['roundtrip_p99_ms']}", ""),
    ]
    for key, name in (("b_redis", "redis"), ("b_memory", "memory")):
        if key in r:
            rate = r[key]["tasks_per_s"]
            rows.append((f"(b) worker, {name} state, add() tasks/s", f"{rate}", ratio(rate, bare)))
    if "c_sleep" in r:
        rate, ideal = r["c_sleep"]["tasks_per_s"], r["c_sleep"]["ideal_per_s"]
        rows.append(
            (f"(c) 50 ms sleeps, tasks/s (ideal {ideal:g})", f"{rate}", f"{rate / ideal:.0%} of ideal")
        )
    for key, name in (("b_redis", "(b) redis"), ("b_memory", "(b) memory"), ("c_sleep", "(c) sleeps")):
        if key in r:
            rows.append(
                (
                    f"{name}: worker CPU per task, µs (start-up, s)",
                    f"{r[key]['worker_cpu_us_per_task']} ({r[key]['worker_startup_s']})",
                    "",
                )
            )
    rows.append(
        (
            "(d) add_task -> join() p50 / p99, ms",
            f"{d['p50_ms']} / {d['p99_ms']}",
            f"x{d['p50_ms'] / a['roundtrip_p50_ms']:.1f} bare p50",
        )
    )
    pub = a["publish_confirmed_per_s"]
    rows.append(
        ("(e) add_task sequential, tasks/s", f"{e['sequential_per_s']}", ratio(e["sequential_per_s"], pub))
    )
    caller_cpu = f"{e['sequential_cpu_us_per_call']}"
    rows.append(("(e) add_task sequential: caller CPU per call, µs", caller_cpu, ""))
    rows.append(
        (
            f"(e) add_task, {e['callers']} concurrent callers, tasks/s",
            f"{e['concurrent_per_s']}",
            ratio(e["concurrent_per_s"], pub),
        )
    )
    return rows


def median_of(runs: list[dict]) -> dict:
    """Field by field median of several runs (nested dicts; non-numbers from the first run)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([run[k] for run in runs if k in run]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(runs), 3)
    return first


async def one_run(bench: Bench) -> dict:
    args, results = bench.args, {}
    results["a_broker"] = await bare_broker(bench)
    results["e_enqueue"] = await enqueue(bench)
    results["b_redis"] = await drain(bench, "redis", "b-redis", "bench.tasks.add", [1, 2], args.tasks)
    results["b_memory"] = await drain(bench, "memory", "b-memory", "bench.tasks.add", [1, 2], args.tasks)
    sleep_n = args.sleep_tasks
    results["c_sleep"] = await drain(bench, "redis", "c", "bench.tasks.sleep", [0.05], sleep_n)
    results["c_sleep"]["ideal_per_s"] = args.concurrency / 0.05
    results["d_roundtrip"] = await round_trips(bench)
    return results


async def main(args: argparse.Namespace) -> dict:
    runs = []
    for i in range(args.repeat):
        bench = Bench(args)
        try:
            await bench.start_app()
            runs.append(await one_run(bench))
        finally:
            await bench.cleanup()
        if args.repeat > 1:
            print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
    summary = median_of(runs)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "worker, RabbitMQ, Redis and this script share the machine",
        },
        "settings": {
            "tasks": args.tasks,
            "sleep_tasks": args.sleep_tasks,
            "roundtrips": args.roundtrips,
            "concurrency": args.concurrency,
            "callers": args.callers,
            "repeat": args.repeat,
        },
        "median": summary,
        "runs": runs,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=5000, help="tasks for (a), (b) and concurrent (e)")
    parser.add_argument("--sleep-tasks", type=int, default=2000, help="50 ms tasks for (c)")
    parser.add_argument("--roundtrips", type=int, default=200, help="sequential round trips for (d)")
    parser.add_argument("--enqueue-sequential", type=int, default=1000, help="sequential add_task calls (e)")
    parser.add_argument("--concurrency", type=int, default=20, help="max_running_tasks / prefetch")
    parser.add_argument("--callers", type=int, default=100, help="concurrent add_task callers")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the table shows medians")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument(
        "--worker-args", nargs=argparse.REMAINDER, default=[], help="extra `g amqp-worker` arguments (last)"
    )
    return parser.parse_args(argv)


def report(results: dict, output: str) -> None:
    rows = table(results["median"])
    width = max(len(r[0]) for r in rows)
    print(f"\nguillotina_amqp benchmark ({results['machine']['cpus']} CPUs, shared with RabbitMQ and Redis)")
    for name, value, rel in rows:
        print(f"  {name:<{width}}  {value:>15}  {rel}")
    for key, label in (("e_enqueue", "add_task"), ("b_redis", "worker, per message")):
        calls = results["median"][key]["redis_calls_per_task"]
        print(f"  Redis commands per task, {label}: {calls}")
    Path(output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    arguments = parse()
    report(asyncio.run(main(arguments)), arguments.output)
