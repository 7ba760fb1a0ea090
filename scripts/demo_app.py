"""The sample application `make run` shows: a task, and a service that schedules it."""

import asyncio
from typing import Any

from guillotina import configure
from guillotina.interfaces import IContainer

from guillotina_amqp import task
from guillotina_amqp.interfaces import MessageType

app_settings: dict[str, Any] = {}


def includeme(root: Any, settings: dict) -> None:
    configure.scan("demo_app")


@task
async def count_words(text: str) -> Any:
    """Reports progress while it counts the words of `text`."""
    words = text.split()
    for number, word in enumerate(words, 1):
        yield (MessageType.DEBUG, f"word {number}: {word}")
        await asyncio.sleep(0.05)
    yield (MessageType.RESULT, len(words))


@configure.service(context=IContainer, method="POST", name="@demo-count", permission="guillotina.AccessContent")
async def schedule_count(context: Any, request: Any) -> dict:
    body = await request.json()
    state = await count_words(body.get("text", ""))
    return {"task_id": state.task_id}
