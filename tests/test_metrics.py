"""`g amqp-worker --metrics-server --port P` serves Prometheus /metrics (docs/operations.md#metrics);
without prometheus-client the worker still runs and says metrics are off."""

import re
import socket

import aiohttp

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import ROOT, WorkerProcess, worker_config
from tests.utils import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def scrape(port: int) -> dict[str, float]:
    """The samples of /metrics: 'name{labels}' -> value (labels as the exposition prints them)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`."""
    for key, value in samples.items():
        match = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if match.group(1) == name and all(found.get(k) == v for k, v in labels.items()):
            return value
    return None


async def test_metrics_count_running_jobs_and_durations_by_final_status(guillotina_main, tmp_path):
    port = free_port()
    gate = tmp_path / "go"
    config = worker_config(max_task_retries=0)
    async with WorkerProcess(config, "--metrics-server", "--port", str(port)) as worker:
        await worker.wait_consuming()
        assert f"Serving Prometheus metrics on port {port}" in worker.output
        for state in [await add_task(app.add, i, i) for i in range(3)]:
            assert (await state.join())["status"] == TaskStatus.FINISHED
        failed = await add_task(app.fail, "on purpose")
        assert (await failed.join())["status"] == TaskStatus.ERRORED
        waiting = await add_task(app.wait_then_log, str(gate))

        async def running(count: float) -> bool:
            return sample(await scrape(port), "amqp_running_jobs") == count

        await wait_for(lambda: running(1.0), 60, "amqp_running_jobs 1")
        gate.touch()
        assert (await waiting.join())["status"] == TaskStatus.FINISHED
        await wait_for(lambda: running(0.0), 60, "amqp_running_jobs 0")
        samples = await scrape(port)

    def duration(stat: str, name: str, status: str) -> float | None:
        return sample(
            samples, f"amqp_job_duration_{stat}", dotted_name=name, final_status=status, container_id=""
        )

    assert duration("count", "tests.app.add", "finished") == 3
    assert duration("count", "tests.app.fail", "errored") == 1
    assert duration("count", "tests.app.wait_then_log", "finished") == 1
    assert duration("count", "tests.app.add", "errored") is None
    # the gated task ran at least as long as the test took to scrape once
    assert duration("sum", "tests.app.wait_then_log", "finished") > duration(
        "sum", "tests.app.add", "finished"
    )
    assert sample(samples, "amqp_jobs_total", final_status="finished") == 4
    assert sample(samples, "amqp_jobs_total", final_status="errored") == 1


async def test_worker_without_prometheus_client_runs_with_metrics_off(guillotina_main, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # a sitecustomize that makes `import prometheus_client` fail, as if it was not installed
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'prometheus_client' or name.startswith('prometheus_client.'):\n"
        "            raise ImportError(f'No module named {name!r} (test shim)')\n"
        "sys.meta_path.insert(0, _Missing())\n"
    )
    port = free_port()
    env = {"PYTHONPATH": f"{shim}:{ROOT}"}
    async with WorkerProcess(worker_config(), "--metrics-server", "--port", str(port), env=env) as worker:
        await worker.wait_consuming()
        state = await add_task(app.add, 2, 3)
        assert (await state.join())["result"] == 5
        assert worker.returncode is None
        assert "prometheus-client is not installed: metrics are off" in worker.output
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, "nothing should serve metrics"


async def test_metrics_port_falls_back_to_the_configuration_port(guillotina_main):
    # as the original plugin did: without --port, the server's `port` setting
    port = free_port()
    config = {**worker_config(), "port": port}
    async with WorkerProcess(config, "--metrics-server") as worker:
        await worker.wait_consuming()
        assert f"Serving Prometheus metrics on port {port}" in worker.output
        assert sample(await scrape(port), "amqp_running_jobs") == 0.0
