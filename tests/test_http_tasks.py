"""HTTP tasks against a real HTTP server on a free loopback port (docs/tasks.md#http-tasks)."""

import asyncio
import contextlib
from collections import Counter

import orjson
import pytest
from aiohttp import web
from guillotina import app_settings

from guillotina_amqp import add_http_task, add_task, http_tasks, settings
from guillotina_amqp.state import TaskState, TaskStatus
from tests.utils import all_empty, queue_counts, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")

SECRET = "Bearer s3cret-value"


class Server:
    """An aiohttp server on 127.0.0.1 and a free port, counting the requests of each path."""

    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app)
        self.hits: Counter = Counter()
        self.port = 0

    async def start(self) -> "Server":
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def serving(routes: dict):
    app = web.Application()
    server = Server(app)

    def counted(path: str, handler):
        async def handle(request: web.Request) -> web.StreamResponse:
            server.hits[path] += 1
            return await handler(request, server)

        return handle

    for path, handler in routes.items():
        app.router.add_route("*", path, counted(path, handler))
    await server.start()
    try:
        yield server
    finally:
        await server.runner.cleanup()


async def echo(request: web.Request, server: Server) -> web.Response:
    body = await request.json() if request.can_read_body else None
    seen = {"method": request.method, "got": body, "auth": request.headers.get("Authorization")}
    seen["trace"] = request.headers.get("X-Trace")
    headers = {"X-Executor": "yes", "Set-Cookie": "session=abc"}
    return web.json_response(seen, headers=headers)


async def flaky(request: web.Request, server: Server) -> web.Response:
    if server.hits["/flaky"] == 1:
        return web.Response(status=500, text="try again")
    return web.Response(text="done at last")


async def missing(request: web.Request, server: Server) -> web.Response:
    return web.Response(status=404, text="no such thing")


async def hang(request: web.Request, server: Server) -> web.Response:
    await server.release.wait()
    return web.Response(text="too late")


async def redirect_in(request: web.Request, server: Server) -> web.Response:
    raise web.HTTPFound("/echo")


async def redirect_out(request: web.Request, server: Server) -> web.Response:
    raise web.HTTPTemporaryRedirect(server.elsewhere)


@pytest.fixture
async def elsewhere(guillotina_main):
    """A server whose port is not allowed."""
    async with serving({"/": echo}) as server:
        yield server


@pytest.fixture
async def executor(guillotina_main, elsewhere, monkeypatch):
    """The allowed executor; amqp.http_tasks allows it only, with a short timeout and a secret."""
    routes = {
        "/echo": echo,
        "/flaky": flaky,
        "/missing": missing,
        "/hang": hang,
        "/redirect-in": redirect_in,
        "/redirect-out": redirect_out,
    }
    async with serving(routes) as server:
        server.release = asyncio.Event()
        server.elsewhere = elsewhere.url("/")
        block = {"allowed": [f"http://127.0.0.1:{server.port}"], "timeout": 0.5, "secrets": {"token": SECRET}}
        monkeypatch.setitem(app_settings["amqp"], "http_tasks", block)
        yield server
        server.release.set()


async def in_error_queue() -> bool:
    return list((await queue_counts()).values())[2] == 1


async def test_2xx_finishes_with_status_headers_and_decoded_json_body(worker, executor):
    state = await add_http_task(
        executor.url("/echo"),
        json={"a": 1},
        headers={"X-Trace": "t-1"},
        secret_headers={"Authorization": "token"},
    )
    final = await state.join()

    assert final["status"] == TaskStatus.FINISHED
    result = final["result"]
    assert result["status"] == 200
    assert result["body"] == {"method": "POST", "got": {"a": 1}, "auth": SECRET, "trace": "t-1"}
    assert result["headers"]["X-Executor"] == "yes"
    assert "Set-Cookie" not in result["headers"]
    # the secret reached the executor, never the task's state (but in the executor's own answer)
    del result["body"]["auth"]
    assert b"s3cret" not in orjson.dumps(final)


async def test_5xx_is_retried_until_it_succeeds(worker, executor):
    state = await add_http_task(executor.url("/flaky"), method="get")
    final = await wait_for(lambda: _ended(state, TaskStatus.FINISHED), timeout=60, what="the retry")

    assert final["job_retries"] == 1
    assert final["result"]["body"] == "done at last"
    assert executor.hits["/flaky"] == 2


async def test_4xx_errors_at_once_without_retry(worker, executor):
    state = await add_http_task(executor.url("/missing"), method="DELETE")
    await wait_for(in_error_queue, timeout=30, what="the message in the error queue")

    final = await state.get_state()
    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 0
    assert "HTTP 404 from DELETE" in final["error"]
    assert "no such thing" in final["error"]
    assert executor.hits["/missing"] == 1


@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_a_hanging_answer_times_out_and_is_retried(worker, executor):
    state = await add_http_task(executor.url("/hang"))
    await wait_for(in_error_queue, timeout=60, what="the message in the error queue")

    final = await state.get_state()
    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 1  # tried twice, then out of retries
    assert "TimeoutError" in final["error"]
    assert executor.hits["/hang"] == 2


async def test_redirects_are_followed_only_to_allowed_urls(worker, executor, elsewhere):
    followed = await (await add_http_task(executor.url("/redirect-in"), method="GET")).join()
    assert followed["status"] == TaskStatus.FINISHED
    assert followed["result"]["body"]["method"] == "GET"

    state = await add_http_task(executor.url("/redirect-out"), secret_headers={"Authorization": "token"})
    await wait_for(in_error_queue, timeout=30, what="the message in the error queue")
    final = await state.get_state()
    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 0
    assert "redirect from" in final["error"] and "not in amqp.http_tasks.allowed" in final["error"]
    assert executor.hits["/redirect-out"] == 1
    assert elsewhere.hits["/"] == 0


@pytest.mark.parametrize(
    "url, options, problem",
    [
        ("elsewhere", {}, "not in amqp.http_tasks.allowed"),
        ("http://localhost:{port}/echo", {}, "not in amqp.http_tasks.allowed"),  # another spelling
        ("https://127.0.0.1:{port}/echo", {}, "not in amqp.http_tasks.allowed"),
        ("ftp://127.0.0.1:{port}/echo", {}, "not an absolute http or https URL"),
        ("/echo", {}, "not an absolute http or https URL"),
        ("http://user:pw@127.0.0.1:{port}/echo", {}, "carries credentials"),
        ("http://127.0.0.1:{port}/echo?access_token=x", {}, "carries credentials"),
        ("http://127.0.0.1:{port}/echo", {"method": "FETCH"}, "not an HTTP method"),
        ("http://127.0.0.1:{port}/echo", {"headers": {"Authorization": SECRET}}, "secret_headers="),
        ("http://127.0.0.1:{port}/echo", {"headers": {"X-A": "1\r\nX-B: 2"}}, "forbidden characters"),
        ("http://127.0.0.1:{port}/echo", {"secret_headers": {"Authorization": "nope"}}, "'nope'"),
    ],
)
async def test_a_refused_request_raises_at_the_call_and_publishes_nothing(executor, url, options, problem):
    url = executor.elsewhere if url == "elsewhere" else url.format(port=executor.port)
    with pytest.raises(ValueError, match=problem):
        await add_http_task(url, _task_id="refused", **options)
    assert await all_empty()
    with pytest.raises(KeyError):
        await TaskState("refused").get_state()


async def test_http_tasks_are_off_until_configured(guillotina_main):
    with pytest.raises(ValueError, match="HTTP tasks are off"):
        await add_http_task("http://127.0.0.1:8080/")
    with pytest.raises(TypeError, match="timeout"):
        await add_http_task("http://127.0.0.1:8080/", timeout=3)
    assert await all_empty()


async def test_the_worker_refuses_a_url_the_call_did_not_check(worker, executor, elsewhere):
    # a message naming the HTTP task directly, as a publisher skipping add_http_task's check would
    state = await add_task(http_tasks.http_request, executor.elsewhere, "POST", {}, {})
    await wait_for(in_error_queue, timeout=30, what="the message in the error queue")

    final = await state.get_state()
    assert final["status"] == TaskStatus.ERRORED
    assert "refused: URL" in final["error"]
    assert final["job_retries"] == 0
    assert elsewhere.hits["/"] == 0


async def _ended(state: TaskState, status: str) -> dict | None:
    found = await state.get_state()
    return found if found["status"] == status else None


def test_the_http_tasks_block_is_read_from_the_environment_as_guillotina_gives_it(monkeypatch):
    # G_AMQP__HTTP_TASKS__ALLOWED='["http://a:1"]' (JSON, parsed by guillotina), __TIMEOUT=5 (text),
    # __SECRETS__BILLING=... (one key of the secrets block)
    block = {"allowed": ["http://a:1"], "timeout": "5", "secrets": {"billing": "Bearer x"}}
    read = settings.parse({"http_tasks": block}).http_tasks
    assert (read.allowed, read.timeout, read.secrets) == (("http://a:1",), 5.0, {"billing": "Bearer x"})
    assert "Bearer" not in repr(read)

    monkeypatch.setenv("G_AMQP__HTTP_TASKS__TIMEOUT", "soon")
    with pytest.raises(
        ValueError, match=r"amqp.http_tasks.timeout \(environment variable G_AMQP__HTTP_TASKS__TIMEOUT\)"
    ):
        settings.parse({"http_tasks": {"timeout": "soon"}})
    with pytest.raises(ValueError, match="^amqp.http_tasks must be a block of settings, not a str$"):
        settings.parse({"http_tasks": '{"secrets": {"billing": "Bearer x"'})  # never shown
    assert settings.parse({"http_tasks": '{"timeout": 7}'}).http_tasks.timeout == 7
