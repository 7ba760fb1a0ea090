"""Workers announce themselves, their running tasks and their load (docs/design.md#operations-bookkeeping).

Each announcement lives for a few status intervals: a worker that dies stops
refreshing it and drops off the list on its own; one that stops cleanly retires it.
"""

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guillotina_amqp.worker import Worker

logger = logging.getLogger("guillotina_amqp")

#: an announcement outlives this many missed status updates
TTL_INTERVALS = 3
#: shortest announcement TTL in seconds, whatever the interval (Redis keeps milliseconds)
MIN_TTL = 1.0


def announcement_ttl(update_status_interval: float) -> float:
    return max(TTL_INTERVALS * update_status_interval, MIN_TTL)


class Presence:
    """What one worker tells the state store about itself."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.started = time.time()
        self.host = socket.gethostname()
        self.pid = os.getpid()

    def info(self) -> dict[str, Any]:
        worker = self.worker
        running = [
            {"task_id": task_id, "function": job.dotted_name, "duration": job.duration}
            for task_id, (job, _) in list(worker._running.items())
        ]
        return {
            "worker_id": worker.worker_id,
            "host": self.host,
            "pid": self.pid,
            "queue": ", ".join(worker.queues),  # what --queue named, not only amqp.queue
            "started": self.started,
            "seen": time.time(),
            "running": running,
            "max_running": worker.max_size,
            "load": len(running) / worker.max_size if worker.max_size else 0.0,
            "total_run": worker.total_run,
            "total_errored": worker.total_errored,
        }

    async def announce(self) -> None:
        """Refresh the announcement; a failure is logged, not raised (the status loop goes on)."""
        ttl = announcement_ttl(self.worker.update_status_interval)
        try:
            await self.worker.state_manager.announce(self.worker.worker_id, self.info(), ttl)
        except Exception as exc:
            logger.warning("Worker %s could not announce itself: %r", self.worker.worker_id, exc)

    async def retire(self) -> None:
        try:
            await self.worker.state_manager.retire(self.worker.worker_id)
        except Exception as exc:
            # it expires on its own; a stopping worker must not fail on it
            logger.warning("Worker %s could not retire its announcement: %r", self.worker.worker_id, exc)
