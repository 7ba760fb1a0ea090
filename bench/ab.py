"""Paired A/B of the worker: two checkouts' venvs, the peers harness's task bodies, CPU per task.

    .venv/bin/python bench/ab.py --kind sleep --repeat 4 old=../other/.venv new=.venv

For each run: N tasks queued with the peers app's producer (`g peers-produce`), then one
`g amqp-worker` started; the steady rate runs from the first completion to the last, and the CPU
per task of the worker, redis-server and RabbitMQ is read from /proc over the same span. The
venvs take turns (A B, B A, ...) so that a machine whose speed drifts favours neither; compare
the medians, and each run's load average says how noisy it was. It uses the peers harness's
app (`--peers`, default ../shared/peers) with an exchange, queues, state database and counter
of its own, so a harness run going on at the same time neither steals nor counts its tasks.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aioamqp
import redis

NAME = "bench_ab"
DB = 11  # the state and the completion counter; the peers harness uses 13
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def oldest(*pattern: str) -> int:
    return int(subprocess.check_output(["pgrep", "-o", *pattern]).split()[0])


def config(peers: Path, directory: str) -> str:
    """The peers app's redis configuration on an exchange, queue, prefix and database of ours."""
    settings = json.loads((peers / "systems/oursbench/config-redis.json").read_text())
    settings["amqp"].update(exchange=NAME, queue=NAME)
    settings["redis"]["db"] = settings["redis"]["pool"]["db"] = DB
    settings["redis_prefix_key"] = f"{NAME}-"
    path = os.path.join(directory, "config.json")
    Path(path).write_text(json.dumps(settings))
    return path


async def purge() -> None:
    transport, protocol = await aioamqp.connect("127.0.0.1", 5672, "guest", "guest")
    try:
        for queue in (NAME, f"{NAME}-error", f"{NAME}-delay"):
            channel = await protocol.channel()  # a missing queue closes its channel
            with contextlib.suppress(aioamqp.ChannelClosed):
                await channel.queue_purge(queue)
    finally:
        await protocol.close()
        transport.close()


def one(venv: str, kind: str, n: int, cfg: str, peers: Path, counter: Any, done_key: str) -> dict:
    g = os.path.join(os.path.abspath(venv), "bin", "g")
    env = {**os.environ, "PYTHONPATH": f"{peers}:{peers / 'systems'}", "PEERS_REDIS_DB": str(DB)}
    asyncio.run(purge())
    counter.delete(done_key)
    produce = [g, "peers-produce", "-c", cfg, "--kind", kind, "--n", str(n)]
    subprocess.run(produce, cwd=peers, env=env, check=True, capture_output=True)
    load = os.getloadavg()[0]
    others = {"redis_us": oldest("-x", "redis-server"), "rabbitmq_us": oldest("-f", "beam.smp")}
    spawned = time.perf_counter()
    worker = subprocess.Popen(
        [g, "amqp-worker", "-c", cfg], cwd=peers, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        first: tuple[float, int, float, dict[str, float]] | None = None
        last: tuple[float, int, float, dict[str, float]] | None = None
        while last is None:
            done, now = int(counter.get(done_key) or 0), time.perf_counter()
            if first is None and done >= 1:
                first = (now, done, cpu_seconds(worker.pid), {k: cpu_seconds(p) for k, p in others.items()})
            if done >= n:
                last = (now, done, cpu_seconds(worker.pid), {k: cpu_seconds(p) for k, p in others.items()})
            if now - spawned > 120 or worker.poll() is not None:
                raise SystemExit(f"the worker did not finish {n} tasks ({done} done)")
            time.sleep(0.002)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert first is not None and last is not None  # the first completion comes before the last
    tasks = max(1, last[1] - first[1])
    row = {"load": round(load, 2), "boot_s": round(first[0] - spawned, 3)}
    row["steady"] = round(tasks / (last[0] - first[0]), 1)
    row["worker_us"] = round(1e6 * (last[2] - first[2]) / tasks)
    row |= {key: round(1e6 * (last[3][key] - first[3][key]) / tasks) for key in others}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("venvs", nargs="+", help="label=venv, two or more")
    parser.add_argument("--kind", default="sleep", choices=["noop", "sleep"])
    parser.add_argument("--n", type=int, default=None, help="tasks a run (noop 5,000, sleep 2,000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", type=Path, default=Path(__file__).resolve().parents[2] / "shared/peers")
    args = parser.parse_args()
    n = args.n or (5000 if args.kind == "noop" else 2000)
    sys.path.insert(0, str(args.peers))
    import common  # the peers harness's counter key

    pairs = [entry.split("=", 1) for entry in args.venvs]
    rows: dict[str, list[dict]] = {label: [] for label, _ in pairs}
    counter = redis.Redis(db=DB)
    with tempfile.TemporaryDirectory() as directory:
        cfg = config(args.peers, directory)
        for turn in range(args.repeat):
            for label, venv in pairs if turn % 2 == 0 else pairs[::-1]:
                row = one(venv, args.kind, n, cfg, args.peers, counter, common.DONE_KEY)
                rows[label].append(row)
                print(label, args.kind, row, flush=True)
    for label, runs in rows.items():
        medians = {key: statistics.median(row[key] for row in runs) for key in runs[0] if key != "load"}
        print(f"== {label} {args.kind}, medians of {len(runs)}: {medians}")


if __name__ == "__main__":
    main()
