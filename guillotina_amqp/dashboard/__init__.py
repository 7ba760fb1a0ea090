"""The operations dashboard (docs/operations.md): one page and its assets, served from this package,
and the stream of task changes it listens to.

The page and its assets hold no data: everything shown comes from the REST services
(guillotina.ManageAMQP), which the page calls with the token of the user who logged in.
"""

import asyncio
import contextlib
import time
from importlib import resources
from typing import Any, AsyncIterator

import orjson
from guillotina.api.service import Service
from guillotina.response import HTTPNotFound, Response

from guillotina_amqp import task_index
from guillotina_amqp.api import _container_prefix, _lookalike_prefix, container_service, visible
from guillotina_amqp.state import get_state_manager

#: the page and its assets open before logging in (the page is where one logs in); they hold no data
PUBLIC: dict[str, Any] = {"permission": "guillotina.Public", "allow_access": True}
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "index.html": "text/html"}
#: a stream ends after this many seconds and the page opens the next one: no connection lives
#: for ever, and a server shutting down (which waits for open responses) waits at most this
STREAM_SECONDS = 60.0
#: a comment line this often keeps proxies from closing an idle stream
KEEPALIVE_SECONDS = 15.0
#: changes arriving this close together go out as one event
COALESCE_SECONDS = 0.1
#: The page runs only its own script and style and talks only to its own origin (the REST
#: services, the event stream): an injected script or a stranger's frame gets nothing.
#: No framing at all (frame-ancestors, and X-Frame-Options for older browsers): clickjacking
#: the cancel and retry buttons needs the page in a frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        # style attributes only (the load bars' widths), no <style> element
        "default-src 'none'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
        "img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPNotFound(content={"reason": f"no dashboard asset {name!r}"})
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    headers = {"Content-Type": f"{ASSETS[name]}; charset=utf-8", "Cache-Control": "no-cache"}
    headers |= SECURITY_HEADERS
    return Response(body=body, status=200, headers=headers)


@container_service(
    "GET", "@amqp-dashboard", "The tasks dashboard page (its data needs guillotina.ManageAMQP)", **PUBLIC
)
async def dashboard(context: Any, request: Any) -> Response:
    return _asset("index.html")


@container_service("GET", "@amqp-dashboard/{asset}", "The dashboard's script and style sheet", **PUBLIC)
async def dashboard_asset(context: Any, request: Any) -> Response:
    return _asset(request.matchdict["asset"])


@container_service(
    "GET", "@amqp-events", "Server-sent events: summaries of this container's tasks as their states change"
)
class TaskEvents(Service):
    async def __call__(self) -> Response:
        response = Response(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass events on as they come
            },
        )
        await response.prepare(self.request)
        await response.write(b": stream open\n\n")
        with contextlib.suppress(ConnectionError, OSError):
            await self._stream(response)
        return response

    async def _stream(self, response: Response) -> None:
        prefix = _container_prefix(self.context)
        ambiguous = _lookalike_prefix(prefix)
        manager = get_state_manager()
        deadline = time.monotonic() + STREAM_SECONDS
        changed: asyncio.Queue[str] = asyncio.Queue()
        disconnected = asyncio.ensure_future(self._disconnected())
        async with manager.changes(prefix) as changes:
            pump = asyncio.ensure_future(_pump(changes, changed))
            try:
                while not disconnected.done() and not pump.done() and time.monotonic() < deadline:
                    ids = await _batch(changed, disconnected)
                    if not ids:
                        await response.write(b": keep-alive\n\n")
                        continue
                    entries = await manager.index_entries(ids)
                    found = [
                        task_index.summary(task_id, state, times)
                        for task_id, (state, times) in zip(ids, entries)
                        # the store's subscription is by prefix: "a" hears "a-x" too; REST's rule
                        if state and visible(task_id, state, self.context, prefix, ambiguous)
                    ]
                    if found:
                        await response.write(b"data: " + orjson.dumps(found) + b"\n\n")
            finally:
                for task in (pump, disconnected):
                    task.cancel()

    async def _disconnected(self) -> None:
        # the request body was read: what the server sends next is the client going away
        while (await self.request.receive())["type"] != "http.disconnect":
            pass


async def _pump(changes: AsyncIterator[str], changed: "asyncio.Queue[str]") -> None:
    async for task_id in changes:
        changed.put_nowait(task_id)


async def _batch(changed: "asyncio.Queue[str]", stop: asyncio.Future) -> list[str]:
    """Ids changed in the next moment (empty after KEEPALIVE_SECONDS of quiet, or on `stop`)."""
    first = asyncio.ensure_future(changed.get())
    await asyncio.wait([first, stop], timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        return []
    ids = {first.result()}
    await asyncio.sleep(COALESCE_SECONDS)
    while not changed.empty():
        ids.add(changed.get_nowait())
    return sorted(ids)
