"""One task message, run inside its Guillotina context, turned into an Outcome.

decode (worker) -> resolve the function -> rebuild request, db, container, user
-> call it inside a transaction -> commit, run request futures -> Outcome.
The worker alone decides what an Outcome means for the message (ack, retry, error queue).
"""

import asyncio
import enum
import inspect
import logging
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from guillotina.component import get_utility
from guillotina.interfaces import IApplication

from guillotina_amqp import context, registry
from guillotina_amqp.exceptions import ObjectNotFoundException
from guillotina_amqp.interfaces import MessageType
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.state.manager import StateManager
from guillotina_amqp.task_vars import amqp_job

logger = logging.getLogger("guillotina_amqp")

#: Object tasks travel as one of these wrappers with the callable's name as first arg.
OBJECT_TASK_WRAPPERS = (
    "guillotina_amqp.utils._run_object_task",
    "guillotina_amqp.utils._yield_object_task",
)


def dotted_name_of(message: dict) -> str:
    """The function of a task message as metrics, logs and the dashboard show it."""
    if message.get("func") in OBJECT_TASK_WRAPPERS:
        return f"run_object_task/{message['args'][0]}"
    return message.get("func") or ""


class Outcome(enum.Enum):
    FINISHED = "finished"
    ERRORED = "errored"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"  # worker shutting down: leave the message for redelivery


class Job:
    """A decoded message and what running it produced."""

    def __init__(self, data: dict[str, Any], settings: AMQPSettings, state_manager: StateManager) -> None:
        self.data = data
        self.settings = settings
        self.state_manager = state_manager
        self.func: Callable[..., Any] = registry.resolve(data["func"], settings)
        if data["func"] in OBJECT_TASK_WRAPPERS:
            if not data["args"]:
                raise registry.InvalidMessage("object task without its callable", self.task_id)
            registry.resolve(data["args"][0], settings)
        self.eventlog: list = []
        self.result: Any = None
        self.error: str | None = None
        self.cancel_requested = False
        self.started: float | None = None
        self.retries = 0

    @property
    def task_id(self) -> str:
        return self.data["task_id"]

    @property
    def dotted_name(self) -> str:
        """The function's name as metrics and logs show it."""
        return dotted_name_of(self.data)

    @property
    def label(self) -> str:
        """How log lines name the task: its id and its function."""
        return f"Task {self.task_id} ({self.dotted_name})"

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started if self.started is not None else 0.0

    def __repr__(self) -> str:
        return f"<Job {self.task_id} {self.dotted_name}>"

    async def run(self, eventlog: list) -> Outcome:
        """Run the task; never raises except to let the worker's shutdown through."""
        self.eventlog = eventlog
        self.started = time.monotonic()
        amqp_job.set(self)
        try:
            self.result = await self._run_in_context()
            return Outcome.FINISHED
        except ObjectNotFoundException as exc:
            logger.warning("%s: %s; finishing without result", self.label, exc)
            self.result = None
            return Outcome.FINISHED
        except asyncio.CancelledError:
            if self.cancel_requested:
                return Outcome.CANCELED
            return Outcome.INTERRUPTED
        except Exception:
            self.error = traceback.format_exc()
            logger.error("%s failed:\n%s", self.label, self.error)
            return Outcome.ERRORED

    async def _run_in_context(self) -> Any:
        req_data = self.data.get("req_data") or {}
        request = context.rebuild_request(req_data)
        db_id, container_id = self.data.get("db_id"), self.data.get("container_id")
        if not db_id:
            context.login(req_data)
            result = await self._call()
            request.execute_futures()
            return result
        db = await context.open_database(db_id)
        tm = db.get_transaction_manager()
        txn = await tm.begin()
        committed = False
        try:
            root = await tm.get_root(txn=txn)
            if container_id:
                await context.enter_container(request, root, container_id)
            context.login(req_data)
            result = await self._call()
            await tm.commit(txn=txn)
            committed = True
            request.execute_futures()
            return result
        finally:
            if not committed:
                await tm.abort(txn=txn)

    async def _call(self) -> Any:
        args, kwargs = self.data["args"], self.data["kwargs"]
        if inspect.isasyncgenfunction(self.func):
            return await self._consume(self.func(*args, **kwargs))
        result = self.func(*args, **kwargs)
        if inspect.isasyncgen(result):
            return await self._consume(result)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _consume(self, generator: Any) -> list | None:
        """Collect RESULT yields in order; append DEBUG yields to the event log as they come."""
        results: list = []
        async for item in generator:
            kind = _message_type(item)
            if kind is MessageType.RESULT:
                results.append(item[1])
            elif kind is MessageType.DEBUG:
                await self.log_event(str(item[1]))
            else:
                logger.warning("%s yielded %r: ignored", self.label, item)
        return results or None

    async def log_event(self, text: str) -> None:
        self.eventlog.append([datetime.now(timezone.utc).isoformat(), text])
        await self.state_manager.update(self.task_id, {"eventlog": self.eventlog})


def _message_type(item: Any) -> MessageType | None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return None
    try:
        return MessageType(item[0])
    except ValueError:
        return None


def root_object() -> Any:
    return get_utility(IApplication, name="root")
