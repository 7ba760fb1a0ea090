"""Prometheus metrics of the worker; a no-op when prometheus-client is not installed."""

import functools
import logging
from typing import Any, Sequence

logger = logging.getLogger("guillotina_amqp")

try:
    import prometheus_client

    RUNNING_JOBS: Any = prometheus_client.Gauge("amqp_running_jobs", "Tasks running on this worker")
    JOB_DURATION: Any = prometheus_client.Histogram(
        "amqp_job_duration",
        "Seconds a task ran, by function, final status and container",
        labelnames=["dotted_name", "final_status", "container_id"],
        # background tasks run from milliseconds to the broker's 30 min consumer_timeout
        buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, float("inf")),
    )
    JOBS: Any = prometheus_client.Counter(
        "amqp_jobs", "Tasks that ended, by final status", labelnames=["final_status"]
    )
    BEACONS: Any = prometheus_client.Counter(
        "amqp_beacons", "Connection-liveness beacons that came back from the broker"
    )
    ENABLED = True
except ImportError:  # pragma: no cover - exercised only without the optional extra
    ENABLED = False


def set_running(count: int) -> None:
    if ENABLED:
        RUNNING_JOBS.set(count)


def measure(metric: Any, value: float, labels: dict[str, str] | Sequence[str] | None = None) -> None:
    """Observe `value` on a histogram or summary, with `labels` (by name or in order) if given.

    A no-op without prometheus-client or without a metric, so callers need no guard.
    """
    if not ENABLED or metric is None:
        return
    if isinstance(labels, dict):
        metric = metric.labels(**labels)
    elif labels:
        metric = metric.labels(*labels)
    metric.observe(value)


def observe(dotted_name: str, final_status: str, container_id: str | None, seconds: float) -> None:
    if ENABLED:
        _labelled(JOB_DURATION, dotted_name, final_status, container_id or "").observe(seconds)
        _labelled(JOBS, final_status).inc()


@functools.lru_cache(maxsize=4096)
def _labelled(metric: Any, *labels: str) -> Any:
    # per task: prometheus_client validates and locks on every labels() call
    return metric.labels(*labels)


def beacon_received() -> None:
    if ENABLED:
        BEACONS.inc()


def start_server(port: int) -> bool:
    """Serve /metrics on `port`; False (and a log line) when prometheus-client is missing."""
    if not ENABLED:
        logger.warning("prometheus-client is not installed: metrics are off")
        return False
    prometheus_client.start_http_server(port)
    logger.info("Serving Prometheus metrics on port %s", port)
    return True
