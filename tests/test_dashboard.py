"""The @amqp-dashboard page in a real browser: the OS Chromium driven by Playwright (docs/operations.md).

Guillotina serves over HTTP (uvicorn) in the test's process and loop; a worker runs in
the same loop, or in a subprocess where a test kills it. Nothing here reloads the page:
what changes on it arrives by itself.
"""

import json
import os
import shutil
import socket
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Page, async_playwright, expect

from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import running_worker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: how long the page may take to show what happened (pushes, the 2 s worker refresh, a TTL)
SHOWN = 30_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = _free_port()
#: Guillotina refuses requests from an origin outside cors.allow_origin, its own included
CORS = {
    "allow_origin": [f"http://127.0.0.1:{PORT}"],
    "allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
    "allow_headers": ["*"],
    "expose_headers": ["*"],
    "allow_credentials": True,
    "max_age": 3660,
}
pytestmark = pytest.mark.app_settings(
    {"test_server_settings": {"host": "127.0.0.1", "port": PORT}, "cors": CORS}
)


@pytest_asyncio.fixture
async def site(served) -> Any:
    """The API over HTTP with a container "guillotina"; yields a caller (method, path, body)."""
    host, port = served
    auth = aiohttp.BasicAuth("root", "admin")
    async with aiohttp.ClientSession(f"http://{host}:{port}", auth=auth) as session:

        async def call(method: str, path: str, body: Any = None) -> Any:
            async with session.request(
                method, path, data=json.dumps(body) if body is not None else None
            ) as resp:
                assert resp.status < 300, f"{method} {path}: HTTP {resp.status} {await resp.text()}"
                return await resp.json()

        await call("POST", "/db", {"@type": "Container", "id": "guillotina"})
        call.url = f"http://{host}:{port}/db/guillotina"  # type: ignore[attr-defined]
        yield call


@pytest_asyncio.fixture
async def blank(site) -> Any:
    """A browser page on the dashboard, not logged in."""
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (scripts/ensure-services.sh does)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(site.url + "/@amqp-dashboard")
            yield page
        finally:
            await browser.close()


async def log_in(page: Page, password: str) -> None:
    await page.fill("#login input[name=username]", "root")
    await page.fill("#login input[name=password]", password)
    await page.click("#login button[type=submit]")


@pytest_asyncio.fixture
async def page(blank) -> Any:
    """A logged-in dashboard page, its live updates connected."""
    await log_in(blank, "admin")
    await expect(blank.locator("#app")).to_be_visible()
    await expect(blank.locator("#login")).to_be_hidden()
    await expect(blank.locator("#live")).to_have_text("live", timeout=SHOWN)
    return blank


@pytest_asyncio.fixture
async def worker_no_retries(site) -> Any:
    """A worker sending a failed task to the error queue at once (no retries)."""
    async with running_worker(no_retries=True) as worker:
        yield worker


def row(page: Page, task_id: str) -> Any:
    return page.locator(f'#tasks tr[data-task-id="{task_id}"]')


async def test_a_wrong_password_is_refused(blank):
    await log_in(blank, "wrong")
    await expect(blank.locator("#login-error")).to_have_text("Wrong user or password.")
    await expect(blank.locator("#app")).to_be_hidden()


async def test_a_task_appears_and_finishes_live(site, page, worker_no_retries, tmp_path):
    go = tmp_path / "go"
    task_id = (await site("POST", "/db/guillotina/@test-call", {"func": "until_file", "args": [str(go)]}))[
        "task_id"
    ]
    task = row(page, task_id)
    await expect(task).to_have_attribute("data-status", "running", timeout=SHOWN)
    await expect(task.locator(".function")).to_have_text("tests.app.until_file")
    await expect(task.locator(".progress")).to_have_text("waiting for the go", timeout=SHOWN)
    # the worker panel names what runs here
    await expect(page.locator("#workers tbody")).to_contain_text("tests.app.until_file", timeout=SHOWN)

    go.write_text("go")
    await expect(task).to_have_attribute("data-status", "finished", timeout=SHOWN)
    await expect(task.locator(".progress")).to_have_text("got the go")
    await expect(task.locator("button")).to_have_count(0)  # neither cancel nor retry


async def test_cancel_a_running_task_from_the_page(site, page, worker_no_retries, tmp_path):
    body = {"func": "until_file", "args": [str(tmp_path / "never")]}
    task_id = (await site("POST", "/db/guillotina/@test-call", body))["task_id"]
    task = row(page, task_id)
    await expect(task).to_have_attribute("data-status", "running", timeout=SHOWN)

    await task.locator("button.cancel").click()
    await expect(task).to_have_attribute("data-status", "canceled", timeout=SHOWN)
    state = await site("GET", f"/db/guillotina/@amqp-tasks/{task_id}")
    assert state["status"] == "canceled"


async def test_retry_an_errored_task_from_the_page(site, page, worker_no_retries, tmp_path):
    go = tmp_path / "fixed"
    task_id = (
        await site("POST", "/db/guillotina/@test-call", {"func": "fail_unless_file", "args": [str(go)]})
    )["task_id"]
    task = row(page, task_id)
    await expect(task).to_have_attribute("data-status", "errored", timeout=SHOWN)
    await expect(task.locator(".progress")).to_contain_text("is missing")

    go.write_text("the cause is fixed")
    await task.locator("button.retry").click()
    await expect(task).to_have_attribute("data-status", "finished", timeout=SHOWN)
    state = await site("GET", f"/db/guillotina/@amqp-tasks/{task_id}")
    assert state["result"] == "fixed"


async def test_filters_hide_other_statuses(site, page, worker_no_retries, tmp_path):
    failed = (await site("POST", "/db/guillotina/@test-call", {"func": "fail", "args": ["x"]}))["task_id"]
    done = (await site("POST", "/db/guillotina/@test-call", {"func": "noop"}))["task_id"]
    await expect(row(page, failed)).to_have_attribute("data-status", "errored", timeout=SHOWN)
    await expect(row(page, done)).to_have_attribute("data-status", "finished", timeout=SHOWN)

    await page.select_option("#status-filter", "errored")  # read again from the server, errored only
    await expect(row(page, failed)).to_be_visible(timeout=SHOWN)
    await expect(row(page, done)).to_have_count(0)
    await page.select_option("#status-filter", "")
    await page.fill("#function-filter", "noop")
    await expect(row(page, done)).to_be_visible(timeout=SHOWN)
    await expect(row(page, failed)).to_be_hidden()


async def test_a_killed_worker_leaves_the_worker_list(site, page):
    process = WorkerProcess(worker_config(update_status_interval=0.2)).start()
    try:
        await process.wait_consuming()
        workers = page.locator("#workers tbody tr")
        await expect(workers).to_have_count(1, timeout=SHOWN)
        await expect(workers.first).to_contain_text(f":{process.process.pid}")  # type: ignore[union-attr]
        process.kill()
        await expect(workers).to_have_count(0, timeout=SHOWN)
        await expect(page.locator("#no-workers")).to_be_visible()
    finally:
        process.stop()


@pytest.mark.skipif(not os.environ.get("AMQP_SCREENSHOT"), reason="makes the README's screenshot")
async def test_screenshot(site, page, worker_no_retries, tmp_path):
    """AMQP_SCREENSHOT=docs/dashboard.png pytest tests/test_dashboard.py -k screenshot"""
    go = tmp_path / "go"
    for _ in range(6):
        await site("POST", "/db/guillotina/@test-call", {"func": "noop"})
    await site("POST", "/db/guillotina/@test-call", {"func": "fail", "args": ["bad input"]})
    for _ in range(2):
        await site("POST", "/db/guillotina/@test-call", {"func": "until_file", "args": [str(go)]})
    await expect(page.locator('#tasks tr[data-status="running"]')).to_have_count(2, timeout=SHOWN)
    await expect(page.locator('#tasks tr[data-status="errored"]')).to_have_count(1, timeout=SHOWN)
    await page.wait_for_timeout(5500)  # the queue panel and chart refresh every 5 s
    await page.screenshot(path=os.environ["AMQP_SCREENSHOT"], full_page=True)
    go.write_text("go")
