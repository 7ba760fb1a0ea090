"""The task queues as operators see them (docs/operations.md): depths, and the error queues' dead letters.

Depths come from passive declares (they never create a queue). Dead letters are
read with basic.get: listing hands every message back; requeueing moves one
message at a time, acking the dead letter only once the main queue confirmed its
copy, so stopping half way loses nothing (at worst one message is in both queues).
"""

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

import aioamqp
import orjson
from aioamqp.channel import Channel

from guillotina_amqp import message as messages
from guillotina_amqp import names, replay
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.exceptions import InvalidMessage
from guillotina_amqp.publishing import Publisher
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.state.manager import get_state_manager, is_valid_task_id
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")

#: headers a requeued copy goes without: the broker's dead-lettering record (it starts clean).
#: The signature stays: a dead letter is never signed again, only passed on as it was signed.
DROPPED_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]
    delivery_tag: int

    def describe(self) -> dict[str, Any]:
        """The message as JSON for people and scripts (its body decoded when it is JSON)."""
        try:
            message: Any = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            message = self.body.decode("utf-8", "replace")
        task = message if isinstance(message, dict) else {}
        deaths = self.headers.get("x-death") or [{}]
        return {
            "task_id": task.get("task_id"),
            "function": task.get("func"),
            "reason": deaths[0].get("reason") if isinstance(deaths[0], dict) else None,
            "message": message,
        }


@contextlib.asynccontextmanager
async def _channel(settings: AMQPSettings) -> AsyncIterator[tuple[AMQPConnection, Channel]]:
    connection = AMQPConnection(settings, name=f"guillotina_amqp operations ({settings.queue})")
    await connection.open(max_time=10)
    try:
        yield connection, await connection.channel()
    finally:
        await connection.close()


def family(settings: AMQPSettings, queue: str | None = None) -> list[str]:
    """The main queues of `queue` (a named queue, or amqp.queue for None / "default"): itself
    and, but with quorum queues, its priority queue; each has its own delay and error queue."""
    main = names.task_queue(queue, settings)
    return [main, *names.priority_queues(settings, [main])]


async def depths(settings: AMQPSettings, queues: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Messages waiting and consumers of the main, delay and error queues of amqp.queue and of
    each named queue of `queues`. A priority queue never declared is left out; any other
    queue that is missing is listed with None (deleted by hand: say so)."""
    found = []
    mains = dict.fromkeys(main for queue in [None, *queues] for main in family(settings, queue))
    async with _channel(settings) as (connection, channel):
        for main in mains:
            optional = names.is_priority_queue(main)
            for queue in names.topology(settings, main):
                try:
                    reply = await channel.queue_declare(queue, passive=True)
                except aioamqp.ChannelClosed:
                    channel = await connection.channel()
                    if not optional:
                        found.append({"queue": queue, "messages": None, "consumers": None})
                    continue
                found.append(
                    {"queue": queue, "messages": reply["message_count"], "consumers": reply["consumer_count"]}
                )
    return found


async def _get(channel: Channel, queue: str) -> DeadLetter | None:
    try:
        reply = await channel.basic_get(queue, no_ack=False)
    except aioamqp.EmptyQueue:
        return None
    headers = dict(getattr(reply["properties"], "headers", None) or {})
    return DeadLetter(reply["message"], headers, reply["delivery_tag"])


async def _waiting(connection: AMQPConnection, channel: Channel, queue: str) -> tuple[Channel, int]:
    """(a usable channel, messages in `queue`); 0 for a queue that does not exist."""
    try:
        return channel, (await channel.queue_declare(queue, passive=True))["message_count"]
    except aioamqp.ChannelClosed:  # a priority queue never used: nothing in it
        return await connection.channel(), 0


async def dead_letters(
    settings: AMQPSettings, limit: int = 100, queue: str | None = None
) -> list[DeadLetter]:
    """Up to `limit` messages of the error queues of `queue` (default amqp.queue; its priority
    queue's too), left in them (unacked, handed back on close)."""
    found: list[DeadLetter] = []
    async with _channel(settings) as (connection, channel):
        for main in family(settings, queue):
            channel, waiting = await _waiting(connection, channel, names.error_queue(main))
            for _ in range(min(waiting, limit - len(found))):
                letter = await _get(channel, names.error_queue(main))
                if letter is None:
                    break
                found.append(letter)
    return found


@dataclass
class Requeued:
    """What a requeue did: the letters moved, and those it refused (left in the error queue)
    with the reason of each."""

    moved: list[DeadLetter]
    refused: list[tuple[DeadLetter, str]]


async def requeue(
    settings: AMQPSettings,
    task_id: str | None = None,
    wanted: Callable[[dict], bool] | None = None,
    queue: str | None = None,
) -> Requeued:
    """Move the dead letters of `queue` (default amqp.queue; only `task_id`'s if given, only
    those whose message `wanted` accepts) back into the queue each died in, as they were
    signed (a priority task's into its priority queue).

    Only the messages there when it starts: one that fails again and comes back is left
    for the next requeue. Skipped and refused messages stay unacked until the end, then go back.
    """
    done = Requeued([], [])
    async with _channel(settings) as (connection, channel):
        mover = _Mover(settings, Publisher(settings, connection), done, task_id, wanted)
        for main in family(settings, queue):
            channel, waiting = await _waiting(connection, channel, names.error_queue(main))
            for _ in range(waiting):
                letter = await _get(channel, names.error_queue(main))
                if letter is None:
                    break
                await mover.move(letter, main, channel)
    return done


@dataclass
class _Mover:
    """One requeue's choice and move of each dead letter it reads."""

    settings: AMQPSettings
    publisher: Publisher
    done: Requeued
    task_id: str | None
    wanted: Callable[[dict], bool] | None

    async def move(self, letter: DeadLetter, main: str, channel: Channel) -> None:
        described = letter.describe()
        if self.task_id is not None and described["task_id"] != self.task_id:
            return
        if self.wanted is not None and not self.wanted(described["message"]):
            return
        problem = refusal(letter, self.settings)
        if problem is not None:
            # %r: the id is the message's own text, whatever it holds
            logger.warning("Dead letter of task %r not requeued: %s", described["task_id"], problem)
            self.done.refused.append((letter, problem))
            return
        headers = {k: v for k, v in letter.headers.items() if k not in DROPPED_HEADERS}
        await _reopen(described["message"])
        await self.publisher.publish(letter.body, main, retries=0, headers=headers, sign=False)
        await channel.basic_client_ack(letter.delivery_tag)
        self.done.moved.append(letter)


def refusal(letter: DeadLetter, settings: AMQPSettings) -> str | None:
    """Why `letter` must not go back to the main queue (None: it may).

    With signing on, a message lands in the error queue because it did not verify, among
    other reasons: requeueing it as it is must not make it runnable, so it is checked as a
    worker checks it — signed with a current or previous key, not a replay.
    """
    try:
        messages.verify(letter.body, letter.headers, settings)
        if settings.signing_key:
            message = orjson.loads(letter.body)
            replay.check_fresh(message if isinstance(message, dict) else {}, settings)
    except InvalidMessage as exc:
        return exc.reason
    except orjson.JSONDecodeError:
        return "body is not valid JSON"
    return None


async def _reopen(message: Any) -> None:
    """A dead letter's run ended `errored`: make it runnable again, with a fresh retry budget
    (only that run's state: a later run of the same id is left alone, and the copy skipped)."""
    if not isinstance(message, dict) or not is_valid_task_id(message.get("task_id")):
        return
    run = message.get("run") if isinstance(message.get("run"), str) else ""
    reopened = {"status": TaskStatus.SCHEDULED, "ended": None, "job_retries": 0, "updated": time.time()}
    await get_state_manager().finish(message["task_id"], reopened, None, owner="", run=run)


async def purge(settings: AMQPSettings, queue: str | None = None) -> int:
    """Drop every message of the error queues of `queue` (default amqp.queue); how many there were."""
    count = 0
    async with _channel(settings) as (connection, channel):
        for main in family(settings, queue):
            channel, waiting = await _waiting(connection, channel, names.error_queue(main))
            if waiting:
                count += int((await channel.queue_purge(names.error_queue(main)))["message_count"])
    return count
