"""Plain `def` tasks run off the event loop (docs/tasks.md): `@task(run_in="thread" | "process")`.

The loop keeps serving other tasks meanwhile. The task's `timeout` (and a cancel,
or the worker stopping) cancels the run like any other: a thread cannot be stopped,
so its result is abandoned (the thread runs on until the function returns); a
process run is its own process, forked from a server process (the forkserver start
method: never a fork of the worker's threads and connections), and is killed.
Either way the function sees its context as plain data: `get_task_context()`
returns a TaskContext (task id, user, roles, container ids).
"""

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import logging
import pickle
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable

from guillotina_amqp.task_vars import amqp_job

if TYPE_CHECKING:  # imported where the first process task starts: most workers never start one
    import multiprocessing.context

logger = logging.getLogger("guillotina_amqp")

THREAD = "thread"
PROCESS = "process"
RUN_IN = (THREAD, PROCESS)


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """What a task runs for, as plain data a thread or another process can hold."""

    task_id: str
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    db_id: str | None = None
    container_id: str | None = None
    container_url: str | None = None

    @classmethod
    def of(cls, data: dict) -> "TaskContext":
        """The context of a decoded message."""
        req_data = data.get("req_data") or {}
        user = req_data.get("user") or {}
        return cls(
            task_id=data["task_id"],
            user_id=user.get("id"),
            roles=tuple(user.get("roles") or ()),
            groups=tuple(user.get("groups") or ()),
            db_id=data.get("db_id"),
            container_id=data.get("container_id"),
            container_url=req_data.get("container_url"),
        )


_context: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "amqp_task_context", default=None
)


def get_task_context() -> TaskContext:
    """The running task's TaskContext: in a thread or process run, and in any task on a worker.

    LookupError outside a task.
    """
    current = _context.get()
    if current is not None:
        return current
    job = amqp_job.get()
    if job is None:
        raise LookupError("get_task_context() is only available while a task runs")
    return TaskContext.of(job.data)


def check_run_in(func: Callable[..., Any] | str, run_in: Any) -> str | None:
    """`run_in` for `func` (or its dotted name) when it can run there; ValueError naming the task."""
    if run_in is None:
        return None
    name = func if isinstance(func, str) else f"{func.__module__}.{func.__qualname__}"
    if run_in not in RUN_IN:
        raise ValueError(f"task {name}: run_in must be 'thread', 'process' or None, not {run_in!r}")
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise ValueError(f"task {name}: run_in is for plain `def` functions; this one is async")
    return run_in


def check_field(value: Any, name: str) -> None:
    """A message's `run_in` field: absent, null, "thread" or "process"; ValueError otherwise."""
    if value not in (None, *RUN_IN):
        raise ValueError(f"{name} is neither 'thread', 'process' nor null")


async def call(func: Callable[..., Any], data: dict) -> Any:
    """`func(*args, **kwargs)` of message `data` in its `run_in` thread or process."""
    context = TaskContext.of(data)
    run_in = data.get("run_in")
    args, kwargs = data["args"], data["kwargs"]
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"run_in={run_in!r} is for plain `def` functions, not {data['func']}")
    if run_in == PROCESS:
        return await _in_process(data["func"], args, kwargs, context)
    return await _in_thread(functools.partial(func, *args, **kwargs), context)


# -- threads ------------------------------------------------------------------
async def _in_thread(call: Callable[[], Any], context: TaskContext) -> Any:
    """`call()` in a thread of its own: a daemon thread, so one abandoned (the run was
    cancelled, its timeout passed) never holds the worker's exit (a pool's threads are)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    # a fresh context: the thread gets plain data, not the loop's request, container or transaction
    ctx = contextvars.Context()
    ctx.run(_context.set, context)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (ctx.run(call), None)
        except BaseException as exc:
            outcome = (None, _as_error(exc))
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, future, *outcome)

    threading.Thread(target=run, name=f"guillotina_amqp {context.task_id}", daemon=True).start()
    try:
        return await future
    except asyncio.CancelledError:
        logger.warning("Task %s: its thread is abandoned and runs on until it returns", context.task_id)
        raise


def _as_error(exc: BaseException) -> Exception:
    """SystemExit & co. raised by a task must not stop the worker: an error caused by them."""
    if isinstance(exc, Exception):
        return exc
    error = RuntimeError(f"the task raised {exc!r}")
    error.__cause__ = exc
    return error


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return  # abandoned (timeout, cancelled)
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


# -- processes ----------------------------------------------------------------
#: seconds a process that answered gets to exit on its own (flushing its output) before it is killed
EXIT_GRACE = 5.0
_mp: "multiprocessing.context.BaseContext | None" = None


async def _mp_context() -> "multiprocessing.context.BaseContext":
    global _mp
    if _mp is None:
        import multiprocessing.forkserver

        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload([__name__])  # type: ignore[attr-defined]
        # starting the server imports guillotina_amqp: seconds the loop must not wait
        await asyncio.to_thread(multiprocessing.forkserver.ensure_running)
        _mp = mp
    return _mp


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a task's process."""


class TaskProcessDied(RuntimeError):
    """A task's process ended without an answer (killed, or exited)."""


async def _in_process(func_name: str, args: list, kwargs: dict, context: TaskContext) -> Any:
    mp = await _mp_context()
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.Process(  # type: ignore[attr-defined]
        target=_child, args=(sender, func_name, args, kwargs, context, list(sys.path)), daemon=True
    )
    process.start()
    sender.close()  # the child holds the only writer: its death reads as end of file
    try:
        await _readable(receiver.fileno())
        answer = _receive(receiver)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_readable(process.sentinel), EXIT_GRACE)
    finally:
        if process.is_alive():
            process.kill()  # cancelled (timeout, cancel, stopping), or lingering after its answer
        process.join()
        receiver.close()
    if answer is None:
        raise TaskProcessDied(f"the task's process exited with code {process.exitcode}")
    return _answer(*answer)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _receive(receiver: Any) -> tuple[bool, Any, str] | None:
    """The child's (ok, result or exception, traceback); None if it died without answering."""
    try:
        return receiver.recv()
    except EOFError:
        return None


def _answer(ok: bool, value: Any, text: str) -> Any:
    if ok:
        return value
    if not isinstance(value, Exception):  # unpicklable, or SystemExit & co: must not stop the worker
        value = RuntimeError(text.strip().splitlines()[-1])
    raise value from RemoteTraceback(text)


def _child(sender: Any, func_name: str, args: list, kwargs: dict, context: TaskContext, path: list) -> None:
    """In the task's process: call the function, send (ok, result or exception, traceback)."""
    sys.path[:] = path
    _context.set(context)
    try:
        module_name, _, attr = func_name.rpartition(".")
        func = getattr(importlib.import_module(module_name), attr)
        func = getattr(func, "func", func)  # a @task definition: the function it wraps
        answer = (True, func(*args, **kwargs), "")
    except BaseException as exc:
        answer = (False, _picklable(exc), traceback.format_exc())
    try:
        sender.send(answer)
    except Exception as exc:  # a result pickle cannot carry
        sender.send((False, None, f"the task's result cannot be sent back: {exc!r}"))
    sender.close()


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc
