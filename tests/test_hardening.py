"""Hardening, second round (issue 22): each test tries what an attacker, a skewed clock or a lost
Redis would do to the surfaces added last (event stream, runs, dead-letter requeue, the CLI,
cursors, HTTP task answers, replays, the dashboard's headers) and asserts it failed safely."""

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator
from unittest import mock

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from guillotina import app_settings

from guillotina_amqp import add_http_task, add_task, names
from guillotina_amqp import message as messages
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus, get_state_manager
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.test_dashboard import CORS, PORT
from tests.test_http_tasks import serving
from tests.test_operations import amqp_tasks, reasons
from tests.test_security import publish, task_message, wait_error_queue, wait_status
from tests.utils import (
    BOTH_MANAGERS,
    REDIS_ONLY,
    admin_channel,
    all_empty,
    error_queue_count,
    lines,
    publish_raw,
    redis_client,
    running_worker,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
G = Path(sys.executable).parent / "g"
KEYS = {"signing_key": "current-key", "previous_signing_keys": ["previous-key"]}
#: a run no store's clock makes before the year 5138: a forgery
FORGED_RUN = "9" * 20 + "-deadbeef"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker"


@pytest.fixture
def signing(guillotina_main) -> dict:
    """Signed messages for this test's process (the settings are read afresh when they change)."""
    app_settings["amqp"] = {**app_settings["amqp"], **KEYS}
    return KEYS


def signed(body: bytes, key: str = "current-key") -> dict:
    return {messages.SIGNATURE_HEADER: messages.signature(body, key)}


def our_message(func: str, *args: Any, **fields: Any) -> dict:
    """A message as add_task makes it outside a container, with `fields` (run, issued...) set."""
    return {**task_message(func, *args), "run": "", **fields}


# -- the event stream --------------------------------------------------------------------
# An HTTP server of its own (the stream is read as a browser reads it), on the dashboard
# tests' port: only one of those modules' servers runs at a time.
http_server = pytest.mark.app_settings(
    {"test_server_settings": {"host": "127.0.0.1", "port": PORT}, "cors": CORS}
)


@pytest_asyncio.fixture
async def http(served) -> AsyncIterator[aiohttp.ClientSession]:
    """A session on the API over HTTP, as root, with containers "guillotina" and "guillotina-x"."""
    host, port = served
    async with aiohttp.ClientSession(
        f"http://{host}:{port}", auth=aiohttp.BasicAuth("root", "admin")
    ) as session:
        for container in ("guillotina", "guillotina-x"):
            async with session.post("/db", json={"@type": "Container", "id": container}) as resp:
                assert resp.status < 300, await resp.text()
        yield session


async def schedule_over_http(session: aiohttp.ClientSession, container: str) -> str:
    async with session.post(f"/db/{container}/@test-call", json={"func": "noop"}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["task_id"]


async def next_event(stream: aiohttp.StreamReader) -> list[dict]:
    """The summaries of the stream's next `data:` event (comments skipped)."""
    while True:
        line = await asyncio.wait_for(stream.readline(), 30)
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            return orjson.loads(line[len(b"data: ") :])


@http_server
async def test_the_event_stream_sends_only_this_containers_tasks(http):
    """Container "guillotina" must not hear "guillotina-x", whose ids start with its prefix."""
    async with http.get("/db/guillotina/@amqp-events") as resp:
        assert resp.status == 200
        seen: list[str] = []
        # the stream subscribes once it is open: schedule until one of ours is heard
        first = await schedule_over_http(http, "guillotina")
        while first not in seen:
            try:
                seen += [task["task_id"] for task in await asyncio.wait_for(next_event(resp.content), 1)]
            except asyncio.TimeoutError:
                first = await schedule_over_http(http, "guillotina")
        theirs = await schedule_over_http(http, "guillotina-x")
        assert theirs.startswith(names.task_id_prefix("db", "guillotina"))  # the look-alike prefix
        last = await schedule_over_http(http, "guillotina")
        while last not in seen:
            seen += [task["task_id"] for task in await next_event(resp.content)]
        assert theirs not in seen
        assert all(names.in_container(task_id, "task:db-guillotina-") for task_id in seen)


@http_server
async def test_the_dashboard_and_its_assets_forbid_framing_and_foreign_code(http):
    for path in ("@amqp-dashboard", "@amqp-dashboard/dashboard.js", "@amqp-dashboard/dashboard.css"):
        async with http.get(f"/db/guillotina/{path}") as resp:
            assert resp.status == 200, path
            policy = resp.headers.get("Content-Security-Policy", "")
            assert "frame-ancestors 'none'" in policy, (path, policy)
            assert "script-src 'self'" in policy and "default-src 'none'" in policy, (path, policy)
            assert resp.headers.get("X-Frame-Options") == "DENY", path


# -- runs ----------------------------------------------------------------------------------
@contextlib.contextmanager
def clock_ahead(seconds: float):
    """This host's clock `seconds` ahead (an API host whose clock is wrong)."""
    real_time, real_ns = time.time, time.time_ns
    with (
        mock.patch("time.time", lambda: real_time() + seconds),
        mock.patch("time.time_ns", lambda: real_ns() + int(seconds * 1e9)),
    ):
        yield


@BOTH_MANAGERS
@pytest.mark.usefixtures("outside_container")
async def test_a_reused_id_runs_again_whatever_the_producers_clocks(worker, marker, manager):
    task_id = f"reused-{uuid.uuid4()}"
    with clock_ahead(3600):  # the first producer is an hour ahead
        first = await add_task(app.write_marker, str(marker), "first", _task_id=task_id)
    assert (await first.join())["result"] == "first"

    second = await add_task(app.write_marker, str(marker), "second", _task_id=task_id)
    final = await second.join()
    assert final["status"] == TaskStatus.FINISHED and final["result"] == "second"
    assert lines(marker) == ["first", "second"]


@BOTH_MANAGERS
@pytest.mark.usefixtures("outside_container")
async def test_a_forged_far_future_run_blocks_no_later_run(worker, marker, manager):
    task_id = f"reused-{uuid.uuid4()}"
    assert (await (await add_task(app.write_marker, str(marker), "first", _task_id=task_id)).join())[
        "result"
    ] == "first"
    forged = our_message("tests.app.write_marker", str(marker), "forged", task_id=task_id, run=FORGED_RUN)
    await publish_raw(orjson.dumps(forged))
    await wait_error_queue(1)  # refused, not run

    second = await add_task(app.write_marker, str(marker), "second", _task_id=task_id)
    final = await second.join()
    assert final["status"] == TaskStatus.FINISHED and final["result"] == "second"
    assert lines(marker) == ["first", "second"]
    third = await add_task(app.write_marker, str(marker), "third", _task_id=task_id)
    assert (await third.join())["result"] == "third"


@BOTH_MANAGERS
@pytest.mark.usefixtures("outside_container")
async def test_the_originals_messages_without_a_run_still_run(worker, marker, manager):
    message = task_message("tests.app.write_marker", str(marker), "original")  # no "run"
    task_id = await publish(message)
    final = await wait_status(task_id, TaskStatus.FINISHED)
    assert final["result"] == "original" and lines(marker) == ["original"]


@REDIS_ONLY
@pytest.mark.parametrize("signed_messages", [False, True], ids=["unsigned", "signed"])
@pytest.mark.usefixtures("outside_container")
async def test_a_queued_message_whose_state_redis_lost_runs_once(
    guillotina_main, marker, manager, signed_messages
):
    if signed_messages:
        app_settings["amqp"] = {**app_settings["amqp"], **KEYS}
    state = await add_task(app.write_marker, str(marker), "ran")  # no worker yet: it waits
    client = await redis_client()
    try:
        lost = [key async for key in client.scan_iter(match=f"{app_settings['redis_prefix_key']}*")]
        assert lost and await client.delete(*lost)  # Redis lost its data
    finally:
        await client.aclose()
    assert not await get_state_manager().exists(state.task_id)

    async with running_worker():
        final = await wait_status(state.task_id, TaskStatus.FINISHED)
        await wait_for(all_empty, what="the queues drained")
    assert final["result"] == "ran" and lines(marker) == ["ran"]


# -- replays of signed messages --------------------------------------------------------------
def _signed_message(marker: Path, **fields: Any) -> tuple[str, bytes, dict]:
    message = our_message("tests.app.write_marker", str(marker), **fields)
    body = orjson.dumps(message)
    return message["task_id"], body, signed(body)


@pytest.mark.app_settings({"amqp": {"replay_window": 60}})
@pytest.mark.usefixtures("outside_container")
async def test_a_signed_message_replayed_after_its_window_is_refused(signing, worker, marker):
    task_id, body, headers = _signed_message(marker, issued=time.time() - 3600)
    await publish_raw(body, headers)
    await wait_error_queue(1)
    state = await wait_status(task_id, TaskStatus.ERRORED)
    assert "replay refused" in state["error"] and "amqp.replay_window" in state["error"]
    assert lines(marker) == []


@pytest.mark.app_settings({"amqp": {"replay_window": 60}})
@pytest.mark.usefixtures("outside_container")
async def test_a_message_waiting_for_its_own_countdown_is_no_replay(signing, worker, marker):
    """Issued an hour ago with a start an hour after its issue: its window starts then."""
    now = time.time()
    task_id, body, headers = _signed_message(marker, issued=now - 3600, eta=now - 1)
    await publish_raw(body, headers)
    assert (await wait_status(task_id, TaskStatus.FINISHED))["result"] == "ran"

    retried_id, body, headers = _signed_message(marker, issued=now - 3600, max_retries=30)
    await publish_raw(body, headers)  # 31 runs, each may wait delayed_ttl_ms (1 s here): too old
    assert "replay refused" in (await wait_status(retried_id, TaskStatus.ERRORED))["error"]
    await wait_error_queue(1)


@pytest.mark.usefixtures("outside_container")
async def test_add_task_signs_its_issue_time(signing, worker, marker):
    before = time.time()
    final = await (await add_task(app.write_marker, str(marker))).join()
    assert final["status"] == TaskStatus.FINISHED
    assert before <= final["job_data"]["issued"] <= time.time()


# -- requeueing dead letters ------------------------------------------------------------------
async def put_dead_letter(body: bytes, headers: dict | None = None) -> None:
    await publish_raw(body, headers, routing_key=names.error_queue(get_settings().queue))


async def take_main() -> dict | None:
    """The first message waiting in the main queue (taken off it), None if it is empty."""
    async with admin_channel() as channel:
        with contextlib.suppress(Exception):
            return await channel.basic_get(get_settings().queue, no_ack=True)
    return None


def signed_config(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(worker_config(**KEYS)))


def forged_as_manager(marker: Path, **fields: Any) -> bytes:
    """What anyone who can publish to the broker sends: Manager roles, no valid signature."""
    message = task_message("tests.app.write_marker", str(marker), "forged", roles=["guillotina.Manager"])
    return orjson.dumps({**message, **fields})


@pytest.mark.usefixtures("outside_container")
async def test_requeue_refuses_a_forged_dead_letter_and_says_why(signing, marker, tmp_path):
    signed_config(tmp_path)
    await put_dead_letter(forged_as_manager(marker))
    await put_dead_letter(forged_as_manager(marker), {messages.SIGNATURE_HEADER: "0" * 64})
    await wait_for(lambda: _error_count_is(2), what="two dead letters")

    code, out, err = await amqp_tasks(tmp_path, "dead-letters", "requeue", "--all")
    assert code == 1, (out, err)
    assert "requeued 0" in out and "refused 2" in out
    assert "unsigned message refused" in out and "does not match any signing key" in out
    assert await take_main() is None  # nothing was published
    assert await error_queue_count() == 2  # both stay where they were

    code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "requeue", "--all", "--json")
    found = json.loads(out)
    assert code == 1 and found["requeued"] == 0 and len(found["refused"]) == 2
    assert all(entry["reason"] for entry in found["refused"])


@pytest.mark.usefixtures("outside_container")
async def test_requeue_keeps_the_original_signature(signing, marker, tmp_path):
    signed_config(tmp_path)
    message = our_message("tests.app.write_marker", str(marker), issued=time.time())
    body = orjson.dumps(message)
    await put_dead_letter(body, signed(body, "previous-key"))
    await wait_for(lambda: _error_count_is(1), what="the dead letter")

    code, out, err = await amqp_tasks(tmp_path, "dead-letters", "requeue", message["task_id"])
    assert code == 0 and "requeued 1" in out, (out, err)
    copy = await wait_for(take_main, what="the requeued copy")
    assert copy["message"] == body
    kept = copy["properties"].headers[messages.SIGNATURE_HEADER]
    kept = kept.decode() if isinstance(kept, bytes) else kept
    assert kept == messages.signature(body, "previous-key")  # not signed again with the current key


@pytest.mark.app_settings({"amqp": {"replay_window": 60}})
@pytest.mark.usefixtures("outside_container")
async def test_requeue_refuses_a_replay_too_old_to_run(signing, marker, tmp_path):
    config = worker_config(**KEYS, replay_window=60)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    message = our_message("tests.app.write_marker", str(marker), issued=time.time() - 3600)
    body = orjson.dumps(message)
    await put_dead_letter(body, signed(body))
    await wait_for(lambda: _error_count_is(1), what="the dead letter")

    code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "requeue", "--all")
    assert code == 1 and "replay refused" in out
    assert await error_queue_count() == 1


async def _error_count_is(count: int) -> bool:
    return await error_queue_count() == count


async def test_rest_requeue_moves_this_containers_verified_letters_only(signing, container_requester, marker):
    prefix = names.task_id_prefix("db", "guillotina")

    def for_container(container: str, **fields: Any) -> dict:
        task_id = names.task_id_prefix("db", container) + str(uuid.uuid4())
        message = our_message("tests.app.write_marker", str(marker), task_id=task_id, **fields)
        return {**message, "db_id": "db", "container_id": container}

    good = for_container("guillotina", issued=time.time())
    forged = for_container("guillotina")
    theirs = for_container("guillotina-x", issued=time.time())
    for message, key in ((good, "current-key"), (forged, "stranger-key"), (theirs, "current-key")):
        body = orjson.dumps(message)
        await put_dead_letter(body, signed(body, key))
    await wait_for(lambda: _error_count_is(3), what="three dead letters")

    async with container_requester as requester:
        answer, status = await requester(
            "POST", "/db/guillotina/@amqp-queues/dead-letters/requeue", data="{}"
        )
        assert status == 200, answer
        assert answer["requeued"] == [good["task_id"]]
        [refused] = answer["refused"]
        assert (
            refused["task_id"] == forged["task_id"] and "does not match any signing key" in refused["reason"]
        )
        assert forged["task_id"].startswith(prefix)

        answer, status = await requester(
            "POST", "/db/guillotina/@amqp-queues/dead-letters/requeue", data="[1]"
        )
        assert status == 400 and "JSON object" in answer["reason"]
    copy = await take_main()
    assert copy is not None and orjson.loads(copy["message"])["task_id"] == good["task_id"]
    assert await error_queue_count() == 2  # the forged one and the other container's


# -- the command line ----------------------------------------------------------------------------
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"


@pytest.mark.usefixtures("outside_container")
async def test_the_command_escapes_control_characters_from_messages(guillotina_main, tmp_path):
    signed_config(tmp_path)  # the requeue refuses the letter (unsigned) and names it
    letter = {**task_message("tests.app.noop"), "task_id": f"id{HOSTILE}", "func": f"func{HOSTILE}"}
    await put_dead_letter(orjson.dumps(letter))
    task_id = str(uuid.uuid4())
    state = {"status": "errored", "error": f"line one\nboom{HOSTILE}", "job_data": {"func": f"f{HOSTILE}"}}
    await get_state_manager().update(task_id, {**state, "eventlog": [["2026-01-01", f"step{HOSTILE}"]]})
    await wait_for(lambda: _error_count_is(1), what="the dead letter")

    outputs = []
    for args, expected in (
        (("dead-letters", "list"), 0),
        (("show", task_id), 0),
        (("list",), 0),
        (("dead-letters", "requeue", "--all"), 1),
    ):
        code, out, err = await amqp_tasks(tmp_path, *args)
        assert code == expected, (args, out, err)
        outputs.append(out + "".join(reasons(err)))
    for output in outputs:
        assert not any(char in output for char in "\x1b\x07\x9b\u202e"), output
    assert "\\x1b]0;owned\\x07" in outputs[0] and "\\u202e" in outputs[0]
    assert "\\x1b[2J" in outputs[1] and "\\x9b31m" in outputs[2] and "\\x07" in outputs[3]
    # a traceback keeps its lines, each below its field: none passes for a field of its own
    [error_line] = [i for i, line in enumerate(outputs[1].splitlines()) if line.startswith("error ")]
    assert outputs[1].splitlines()[error_line + 1].startswith(" ")


async def test_the_worker_escapes_control_characters_in_its_log(guillotina_main):
    async with WorkerProcess(worker_config()) as process:
        await process.wait_consuming()
        await publish_raw(orjson.dumps({**task_message("tests.app.noop"), f"bad{HOSTILE}": 1}))
        await wait_for(lambda: "unknown fields" in process.output, what="the refusal in the log")
        await wait_for(lambda: _error_count_is(1), what="the refused message in the error queue")
    assert not any(char in process.output for char in "\x1b\x07\x9b\u202e")
    assert "unknown fields bad\\x1b]0;owned\\x07" in process.output


def shipped_environment(database: str) -> dict[str, str]:
    """This test's queues, Redis prefix and database over the shipped config.yaml (G_ variables,
    as a deployment sets them); no PYTHONPATH."""
    amqp = app_settings["amqp"]
    host, _, port = os.environ["REDIS"].partition(":")
    pg_host, _, pg_port = os.environ["POSTGRESQL"].partition(":")
    return {
        "PATH": "/usr/bin:/bin",
        "G_AMQP__HOST": amqp["host"],
        "G_AMQP__PORT": str(amqp["port"]),
        "G_AMQP__EXCHANGE": amqp["exchange"],
        "G_AMQP__QUEUE": amqp["queue"],
        "G_REDIS__HOST": host,
        "G_REDIS__PORT": port,
        "G_REDIS_PREFIX_KEY": app_settings["redis_prefix_key"],
        "G_DATABASES__DB__DSN": f"postgres://postgres@{pg_host}:{pg_port}/{database}",
    }


async def test_the_command_prints_only_what_was_asked_with_the_shipped_config(pg_database, guillotina_main):
    process = await asyncio.create_subprocess_exec(
        str(G),
        "amqp-tasks",
        "-c",
        "config.yaml",
        "queues",
        cwd=str(ROOT),
        env=shipped_environment(pg_database),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert err.decode() == ""  # no start-up INFO lines, no "Timeout for Command._run_async"
    header, *rows = out.decode().splitlines()
    assert header.split() == ["QUEUE", "MESSAGES", "CONSUMERS"]
    assert [row.split()[0] for row in rows] == list(names.topology(get_settings()))


# -- cursors -------------------------------------------------------------------------------------
def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        b'["nan", "x"]',
        b'["inf", "x"]',
        b'["-Infinity", "x"]',
        b'[true, "x"]',
        b"[1, 2]",
        b'[1, "x", 3]',
        b"{}",
    ],
    ids=["nan-text", "inf-text", "minus-infinity-text", "bool", "id-not-text", "three", "object"],
)
async def test_every_malformed_cursor_answers_400(container_requester, raw):
    async with container_requester as requester:
        body, status = await requester("GET", f"/db/guillotina/@amqp-tasks?cursor={_cursor(raw)}")
        assert status == 400 and "invalid cursor" in body["reason"], (raw, status, body)


# -- HTTP task answers ---------------------------------------------------------------------------
async def large(request: web.Request, server: Any) -> web.StreamResponse:
    """2,000 bytes, sent in chunks without a Content-Length (a size known only by reading it)."""
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(20):
        await response.write(b"x" * 100)
    await response.write_eof()
    return response


async def declared(request: web.Request, server: Any) -> web.Response:
    return web.Response(text="y" * 2000)


async def small(request: web.Request, server: Any) -> web.Response:
    return web.Response(text="z" * 1000)


@pytest.mark.usefixtures("outside_container")
async def test_an_http_answer_larger_than_max_body_bytes_errors_the_task(worker, monkeypatch):
    async with serving({"/large": large, "/declared": declared, "/small": small}) as server:
        block = {"allowed": [f"http://127.0.0.1:{server.port}"], "timeout": 30, "max_body_bytes": 1000}
        monkeypatch.setitem(app_settings["amqp"], "http_tasks", block)
        fitting = await (await add_http_task(server.url("/small"), method="GET")).join()
        assert fitting["status"] == TaskStatus.FINISHED and fitting["result"]["body"] == "z" * 1000
        for path in ("/large", "/declared"):
            final = await (await add_http_task(server.url(path), method="GET")).join()
            assert final["status"] == TaskStatus.ERRORED, path
            assert "larger than amqp.http_tasks.max_body_bytes (1000 bytes)" in final["error"], path
            assert final.get("result") is None
            assert final["job_retries"] == 0  # the same answer would come again: not retried
