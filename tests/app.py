"""A test-only Guillotina application holding sample tasks (importable by worker subprocesses)."""

import asyncio
import os
from typing import Any

from guillotina import configure, task_vars
from guillotina.interfaces import IContainer, IResource
from guillotina.utils import get_authenticated_user

from guillotina_amqp import add_object_task, add_task, object_task, task
from guillotina_amqp.interfaces import MessageType
from guillotina_amqp.task_vars import amqp_job

app_settings: dict[str, Any] = {}


def includeme(root: Any, settings: dict) -> None:
    configure.scan("tests.app")


async def add(a: int, b: int) -> int:
    return a + b


async def noop() -> None:
    return None


async def falsy(kind: str) -> Any:
    return {"zero": 0, "empty": "", "list": [], "false": False}[kind]


async def fail(message: str = "boom") -> None:
    raise ValueError(message)


async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def blocking_sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


async def write_marker(path: str, text: str = "ran") -> str:
    """Appends a line to `path`: the observable side effect tests count."""
    with open(path, "a") as fh:
        fh.write(text + "\n")
    return text


async def sleep_then_mark(path: str, seconds: float) -> str:
    await write_marker(path, "started")
    await asyncio.sleep(seconds)
    return await write_marker(path, "done")


async def exit_worker(path: str) -> None:
    """Appends "started", then ends its worker's process on the spot, as an OOM kill would."""
    await write_marker(path, "started")
    os._exit(1)


async def fail_until(path: str, failures: int) -> int:
    """Fails the first `failures` runs (counted in `path`), then returns the run number."""
    runs = 1 + (len(open(path).read().splitlines()) if os.path.exists(path) else 0)
    await write_marker(path)
    if runs <= failures:
        raise RuntimeError(f"failing run {runs}")
    return runs


async def context_info() -> dict:
    """What a task sees of its context: user, container, request, own id."""
    user = get_authenticated_user()
    container = task_vars.container.get()
    request = task_vars.request.get()
    return {
        "user": getattr(user, "id", None),
        "roles": sorted(getattr(user, "roles", {}) or {}),
        "groups": list(getattr(user, "groups", []) or []),
        "container": getattr(container, "id", None),
        "url": getattr(request, "url", None),
        "method": getattr(request, "method", None),
        "header": request.headers.get("X-Custom") if request is not None else None,
        "task_id": amqp_job.get().data["task_id"],
    }


async def progress(steps: int) -> Any:
    for step in range(steps):
        yield (MessageType.DEBUG, f"step {step}")
        yield (MessageType.RESULT, step)
        yield "not a message"


async def set_title(ob: IResource, title: str) -> str:
    ob.title = title
    ob.register()
    return title


async def titles(ob: IResource, *suffixes: str) -> Any:
    for suffix in suffixes:
        ob.title = f"{ob.title}{suffix}"
        ob.register()
        yield (MessageType.RESULT, ob.title)


@task
async def decorated_add(a: int, b: int) -> int:
    return a + b


@task(retries=1)
async def decorated_info() -> dict:
    return await context_info()


@object_task
async def decorated_set_title(ob: IResource, title: str) -> str:
    return await set_title(ob, title)


@configure.service(
    context=IContainer, method="POST", name="@test-schedule", permission="guillotina.AccessContent"
)
async def schedule_from_request(context: Any, request: Any) -> dict:
    """Schedules what the body names, the way an application's service would."""
    body = await request.json()
    kind = body.get("kind", "add")
    if kind == "object":
        ob = await context.async_get(body["id"])
        state = await add_object_task(set_title, ob, body["title"])
    elif kind == "after_request":
        return {"name": decorated_add.after_request(1, 2), "task_id": None}
    elif kind == "after_commit":
        decorated_add.after_commit(2, 3)
        return {"task_id": None}
    else:
        state = await add_task(context_info)
    return {"task_id": state.task_id}


# -- public API / REST / context tests (tests/test_api.py, test_context.py, test_rest.py) --

from guillotina.auth.users import GuillotinaUser  # noqa: E402
from guillotina.content import create_content_in_container  # noqa: E402

from guillotina_amqp.state import get_state_manager  # noqa: E402

configure.role("tests.AMQPManager", "Manages AMQP tasks but may not debug them (tests)", local=False)
configure.grant(permission="guillotina.ManageAMQP", role="tests.AMQPManager")
configure.grant(permission="guillotina.AccessContent", role="tests.AMQPManager")
configure.role("tests.Scheduler", "May call the scheduling services (tests)", local=False)
configure.grant(permission="guillotina.AccessContent", role="tests.Scheduler")


class TokenUserIdentifier:
    """Test-only auth: the user is whoever the JWT names, with the roles and groups it lists."""

    async def get_user(self, token: dict) -> GuillotinaUser:
        claims = token.get("decoded", {})
        return GuillotinaUser(
            user_id=token["id"],
            groups=list(claims.get("groups", [])),
            roles={role: 1 for role in claims.get("roles", [])},
        )


async def request_info() -> dict:
    """context_info plus what else the worker rebuilt: annotations and the database."""
    request = task_vars.request.get()
    annotations = {key: request[key] for key in request} if request is not None else {}
    return {
        **await context_info(),
        "annotation": annotations.get("test-annotation"),
        "db": getattr(task_vars.db.get(), "id", None),
    }


async def create_item(item_id: str, title: str) -> str:
    """Creates an Item in the current container: committed only if the worker commits."""
    item = await create_content_in_container(task_vars.container.get(), "Item", item_id, title=title)
    return item.id


async def until_exists(path: str, seconds: float = 60) -> None:
    """Wait until the file `path` exists (the test says go), for `seconds` at most."""
    for _ in range(int(seconds / 0.05)):
        if os.path.exists(path):
            return
        await asyncio.sleep(0.05)


async def wait_then_log(path: str) -> Any:
    """Logs one event, waits until `path` exists (the test says go), logs another."""
    yield (MessageType.DEBUG, "first")
    await until_exists(path)
    yield (MessageType.DEBUG, "second")
    yield (MessageType.RESULT, "done")


async def only_junk() -> Any:
    yield "not a message"
    yield ("unknown", 1)
    yield (MessageType.RESULT, 1, 2)


@configure.service(
    context=IContainer, method="POST", name="@test-context", permission="guillotina.AccessContent"
)
async def schedule_with_annotation(context: Any, request: Any) -> dict:
    """Annotates the request, then schedules request_info from it."""
    request["test-annotation"] = (await request.json()).get("annotation")
    state = await add_task(request_info)
    return {"task_id": state.task_id}


@configure.service(
    context=IContainer, method="POST", name="@test-deferred", permission="guillotina.AccessContent"
)
async def schedule_deferred(context: Any, request: Any) -> dict:
    """Schedules decorated_add(a, b) from a request or transaction hook.

    Answers which tasks existed when the service returned, so a test can tell
    that nothing was scheduled before the request/transaction ended.
    """
    body = await request.json()
    hook, args = body["hook"], (body["a"], body["b"])
    name = None
    if hook == "after_request":
        name = decorated_add.after_request(*args, _name=body.get("name"))
    elif hook == "after_commit":
        decorated_add.after_commit(*args)
    else:
        decorated_add.before_commit(*args)
    context.title = f"scheduled {hook}"
    context.register()
    existing = [task_id async for task_id in get_state_manager().list()]
    if body.get("fail"):
        raise ValueError("the request fails after scheduling")
    return {"name": name, "existing": existing}


from zope.interface import Interface  # noqa: E402


class IFlagUtility(Interface):
    """Provided only by FlagUtility (tests/test_event_loop.py)."""


class FlagUtility:
    """An async utility that records that guillotina awaited its initialize(), and on which loop."""

    def __init__(self, settings: dict | None = None) -> None:
        self.initialized = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def initialize(self, app: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.initialized = True

    async def finalize(self, app: Any = None) -> None:
        self.initialized = False


async def create_item_then_fail(item_id: str, title: str) -> None:
    """Writes, then raises: the worker must abort, so nothing is written."""
    await create_item(item_id, title)
    raise RuntimeError("failing after writing")


async def mark_pid(path: str, label: str) -> int:
    """Appends "<label> <pid>": which process ran which task."""
    await write_marker(path, f"{label} {os.getpid()}")
    return os.getpid()


# -- liveness / shutdown tests (tests/test_shutdown.py, test_metrics.py) --


async def sleep_then_mark_pid(path: str, seconds: float) -> int:
    """Appends "started <pid>", sleeps, appends "done <pid>": who started and who finished it."""
    await write_marker(path, f"started {os.getpid()}")
    await asyncio.sleep(seconds)
    await write_marker(path, f"done {os.getpid()}")
    return os.getpid()


async def fail_when_told(path: str, go: str) -> None:
    """Logs a run in `path`, waits until the file `go` exists (the test says when), then fails."""
    await write_marker(path, "started")
    await until_exists(go)
    raise RuntimeError("failing when told")


# -- context tests: layers, registry, user data, request futures (tests/test_context.py) --

from guillotina.addons import Addon  # noqa: E402
from guillotina.interfaces import ILayers  # noqa: E402
from guillotina.utils import get_database, get_registry  # noqa: E402
from guillotina.utils.execute import after_request  # noqa: E402

TEST_LAYER = "tests.app.IAMQPTestLayer"
TEST_RECORD = "tests.app.amqp_record"


class IAMQPTestLayer(Interface):
    """Marker layer that the "amqp-test-layer" add-on activates on its container."""


@configure.addon(name="amqp-test-layer", title="guillotina_amqp tests: a layer and a registry record")
class LayerAddon(Addon):
    @classmethod
    async def install(cls, container: Any, request: Any) -> None:
        registry = await get_registry()
        registry.for_interface(ILayers)["active_layers"] |= {TEST_LAYER}
        registry[TEST_RECORD] = f"set in {container.id}"

    @classmethod
    async def uninstall(cls, container: Any, request: Any) -> None:
        registry = await get_registry()
        registry.for_interface(ILayers)["active_layers"] -= {TEST_LAYER}
        registry[TEST_RECORD] = None


async def layer_info() -> dict:
    """Whether the rebuilt request provides the test layer; the test record as the registry holds it."""
    request = task_vars.request.get()
    var_registry = task_vars.registry.get()
    registry = await get_registry()
    return {
        "layer": IAMQPTestLayer.providedBy(request),
        "record_task_var": var_registry.get(TEST_RECORD) if var_registry is not None else None,
        "record_get_registry": registry.get(TEST_RECORD) if registry is not None else None,
    }


class DataTokenUserIdentifier(TokenUserIdentifier):
    """TokenUserIdentifier whose users also carry the token's `data` and `headers` claims."""

    async def get_user(self, token: dict) -> GuillotinaUser:
        user = await super().get_user(token)
        claims = token.get("decoded", {})
        user.data = dict(claims.get("data", {}))  # type: ignore[attr-defined]
        user.headers = dict(claims.get("headers", {}))  # type: ignore[attr-defined]
        return user


async def user_info() -> dict:
    """The logged-in user's id, data and headers, as the task sees them."""
    user = get_authenticated_user()
    return {
        "user": getattr(user, "id", None),
        "data": getattr(user, "data", None),
        "headers": getattr(user, "headers", None),
    }


async def root_password_set() -> bool:
    """Whether this process holds a (hashed) root password."""
    from guillotina.component import get_utility
    from guillotina.interfaces import IApplication

    return bool(get_utility(IApplication, name="root").root_user.password)


@configure.service(context=IContainer, method="POST", name="@test-run", permission="guillotina.AccessContent")
async def schedule_named(context: Any, request: Any) -> dict:
    """Schedules the task of tests.app that the body names (one of RUNNABLE)."""
    func = RUNNABLE[(await request.json())["task"]]
    state = await (func() if hasattr(func, "schedule") else add_task(func))
    return {"task_id": state.task_id}


RUNNABLE = {"user_info": user_info, "layer_info": layer_info}

#: what each request future of create_item_with_future saw when it ran (in-process workers)
FUTURES_RAN: list[dict] = []


async def create_item_with_future(item_id: str, title: str) -> str:
    """create_item, plus a request future recording whether the item was committed when it ran."""
    after_request(record_item_visible, task_vars.db.get().id, task_vars.container.get().id, item_id)
    return await create_item(item_id, title)


async def record_item_visible(db_id: str, container_id: str, item_id: str) -> None:
    """Looks for the item in a transaction of its own: only committed content is there."""
    seen: dict[str, Any] = {"item": item_id}
    try:
        tm = (await get_database(db_id)).get_transaction_manager()
        txn = await tm.begin()
        try:
            container = await (await tm.get_root(txn=txn)).async_get(container_id)
            seen["visible"] = await container.async_contains(item_id)
        finally:
            await tm.abort(txn=txn)
    except Exception as exc:  # the test shows it rather than timing out on nothing
        seen["error"] = repr(exc)
    FUTURES_RAN.append(seen)


async def unstorable(kind: str) -> Any:
    """Returns what a result's JSON cannot hold."""
    return {"set": {1, 2}, "bytes": b"raw", "int-keys": {1: "one"}}[kind]


async def sleep_then_add(seconds: float, a: int, b: int) -> int:
    await asyncio.sleep(seconds)
    return a + b


# -- task control (tests/test_control.py, docs/tasks.md) --

import time  # noqa: E402

from guillotina_amqp.exceptions import Discard, Fail, Reject, Retry  # noqa: E402
from guillotina_amqp.interfaces import ITaskEvent  # noqa: E402


def _stamp(path: str) -> int:
    """Append the time of this run to `path`; return the run's number (1 for the first)."""
    with open(path, "a") as fh:
        fh.write(f"{time.time()}\n")
    return len(open(path).read().splitlines())


async def steer(path: str, how: str, delay: float | None = None, times: int = 1) -> int:
    """For its first `times` runs raise what `how` names (retry, reject, discard, fail);
    then return the run's number."""
    run = _stamp(path)
    if run > times:
        return run
    raise {
        "retry": lambda: Retry(delay=delay, reason=f"not yet (run {run})"),
        "reject": lambda: Reject(delay=delay),
        "discard": lambda: Discard(reason="nothing left to do"),
        "fail": lambda: Fail("the server said 404"),
    }[how]()


async def stamp_and_fail(path: str) -> None:
    _stamp(path)
    raise RuntimeError("failing on purpose")


@task(timeout=0.5, max_retries=0)
async def limited_sleep(path: str, seconds: float) -> float:
    return await sleep_then_mark(path, seconds) and seconds


#: every task event received, in order, for tests to filter by task id
EVENTS: list[Any] = []
#: task ids whose events make `failing_subscriber` raise
ANGRY_ABOUT: set[str] = set()


@configure.subscriber(for_=ITaskEvent, priority=1)
def failing_subscriber(event: Any) -> None:
    """Runs first and raises for the tasks a test names: the task and the others must not care."""
    if event.task_id in ANGRY_ABOUT:
        raise RuntimeError(f"subscriber fails on purpose for {event.task_id}")


@configure.subscriber(for_=ITaskEvent)
async def record_event(event: Any) -> None:
    EVENTS.append(event)


def events_of(task_id: str) -> list[Any]:
    """The events a task's subscribers were told, in order."""
    return [event for event in EVENTS if event.task_id == task_id]


async def stamp(path: str = "") -> float:
    """The time the task ran (and a line in `path`, if given)."""
    if path:
        await write_marker(path)
    return time.time()


# -- operations tests: the dashboard and `g amqp-tasks` (tests/test_operations.py, test_dashboard.py) --


async def until_file(go: str, fail: bool = False) -> Any:
    """Reports progress, waits until the file `go` exists, then ends (or fails if told to)."""
    yield (MessageType.DEBUG, "waiting for the go")
    await until_exists(go, 120)
    yield (MessageType.DEBUG, "got the go")
    if fail:
        raise RuntimeError("failing as told")
    yield (MessageType.RESULT, "done")


async def fail_unless_file(go: str) -> str:
    """Fails until the file `go` exists: a task an operator retries once the cause is fixed."""
    if not os.path.exists(go):
        raise RuntimeError(f"{go} is missing")
    return "fixed"


@configure.service(
    context=IContainer, method="POST", name="@test-call", permission="guillotina.AccessContent"
)
async def schedule_call(context: Any, request: Any) -> dict:
    """Schedules tests.app.<func>(*args) in this container (func one of CALLABLE)."""
    body = await request.json()
    state = await add_task(CALLABLE[body["func"]], *body.get("args", []))
    return {"task_id": state.task_id}


CALLABLE = {"until_file": until_file, "fail_unless_file": fail_unless_file, "noop": noop, "fail": fail}


async def retry_once_then_mark(path: str, label: str) -> str:
    """The first run asks to be retried half a second later; the next one appends `label` to `path`."""
    tried = f"{path}.{label}.tried"
    if not os.path.exists(tried):
        open(tried, "w").close()
        raise Retry(delay=0.5, reason="once more")
    return await write_marker(path, label)


@task(priority=5)
async def prioritized(path: str, label: str) -> str:
    return await write_marker(path, label)


# -- when and where tasks run (tests/test_expiry.py, test_offload.py, test_periodic.py) --

import dataclasses  # noqa: E402

from guillotina_amqp import get_task_context  # noqa: E402


def wait_for_file(path: str, go: str, seconds: float = 60) -> str:
    """A plain def that blocks its thread (or process) until `go` exists: marks "started <pid>"
    first, "done" after; gives up after `seconds`."""
    with open(path, "a") as fh:
        fh.write(f"started {os.getpid()}\n")
    deadline = time.monotonic() + seconds
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(path, "a") as fh:
        fh.write("done\n")
    return "done"


def sync_context() -> dict:
    """The TaskContext a plain def sees, and the process it runs in."""
    return {**dataclasses.asdict(get_task_context()), "pid": os.getpid()}


def sync_fail(message: str) -> None:
    if message == "exit":
        raise SystemExit(3)
    raise ValueError(message)


@task(run_in="thread")
def thread_context() -> dict:
    return sync_context()


@task(run_in="process")
def process_context() -> dict:
    return sync_context()


@task(expires=0.001)
async def soon_expired() -> str:
    return "ran"


RUNNABLE.update({"thread_context": thread_context, "process_context": process_context})


#: the variable naming the file tests.periodic_app's firings append to (worker processes)
PERIODIC_MARKS_ENV = "AMQP_TEST_PERIODIC_MARKS"
#: task ids of the runs of record_period, in order (in-process workers)
PERIODS: list[str] = []


async def record_period() -> str:
    """A periodic task for in-process workers: records which period it runs for."""
    task_id = amqp_job.get().data["task_id"]
    PERIODS.append(task_id)
    return task_id
