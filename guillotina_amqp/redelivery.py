"""Copies of a delivery redelivered while this worker still runs it.

See docs/operations.md#long-tasks-and-rabbitmqs-consumer_timeout.

RabbitMQ closes a channel whose delivery stays unacknowledged past its `consumer_timeout` and
requeues everything that channel held; the worker consumes again on a new channel and its
tasks go on. The copy it is then delivered of a task it still runs is kept here: unacked (should
this worker die, RabbitMQ still has it to give to another), without a slot, logged once per run,
and settled when the run ends: it takes over the run's disposition when the original's channel
is gone (its ack or move would be lost), else it is acked (the original settled the run).

The consuming channel's prefetch counts what runs here on closed channels and what is kept
aside on it, so the worker never holds more deliveries than it has slots for.
"""

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, NamedTuple, TypeVar

logger = logging.getLogger("guillotina_amqp")

#: a delivery's run: (task id, run id)
Key = tuple[str, str]
#: the worker's disposition (what to do with a message): this module only hands it around
D = TypeVar("D")


def is_open(channel: Any) -> bool:
    """Whether a delivery's channel can still settle it (the original's test channels have no
    is_open: open)."""
    return bool(getattr(channel, "is_open", True))


class Copy(NamedTuple, Generic[D]):
    delivery: Any
    ack: D  # what settles it when the original settled the run itself
    settled: "asyncio.Future[D]"


class Redeliveries(Generic[D]):
    """The runs this worker handles now, by (task id, run), and the copies kept aside for them."""

    def __init__(self, leave: D) -> None:
        #: the disposition that leaves a message as it is (unacked, or already gone with its channel)
        self._leave = leave
        #: set when the prefetch may have to change (a copy kept aside, a run on a closed channel ended)
        self.changed = asyncio.Event()
        self._runs: dict[Key, Any] = {}  # the original delivery of each run
        self._copies: dict[Key, list[Copy[D]]] = {}
        self._logged: set[Key] = set()

    def running(self, key: Key) -> bool:
        return key in self._runs

    async def hold(self, key: Key, label: str, delivery: Any, ack: D) -> D:
        """Keep a copy of the run `key` aside until that run ends; what to do with it then."""
        settled: asyncio.Future[D] = asyncio.get_running_loop().create_future()
        self._copies.setdefault(key, []).append(Copy(delivery, ack, settled))
        self.changed.set()
        if key not in self._logged:
            # once per run: each later consumer_timeout redelivers it again, silently
            self._logged.add(key)
            original = "its channel closed" if not is_open(self._runs[key].channel) else "a duplicate"
            logger.info(
                "%s delivered again while this worker runs it (%s); kept aside unacked, "
                "without a slot, until the run ends",
                label,
                original,
            )
        try:
            return await settled
        finally:
            self._discard(key, settled)

    async def run(self, key: Key, delivery: Any, decided: Awaitable[D]) -> D:
        """Await the run's disposition; hand it to a kept copy if the original's channel is gone."""
        self._runs[key] = delivery
        try:
            disposition = await decided
        except BaseException:
            self._end(key, None)  # stopping, or a bug: the copies stay unacked
            raise
        return self._end(key, disposition)

    def _end(self, key: Key, disposition: D | None) -> D:
        original = self._runs.pop(key)
        self._logged.discard(key)
        copies = self._copies.pop(key, [])
        if copies or not is_open(original.channel):
            self.changed.set()
        live = [copy for copy in copies if is_open(copy.delivery.channel)]
        # the newest live copy takes over: the original's settling would be lost with its channel
        heir = live[-1] if live and disposition is not None and not is_open(original.channel) else None
        for copy in copies:
            if copy is heir:
                outcome = disposition
            elif any(copy is other for other in live) and disposition is not None:
                outcome = copy.ack
            else:
                outcome = self._leave  # gone with its channel, or left for redelivery with the run
            if not copy.settled.done():
                copy.settled.set_result(outcome)  # type: ignore[arg-type]
        if heir is not None:
            logger.debug("%s: settled by its copy", key[0])
            return self._leave
        return disposition if disposition is not None else self._leave

    def _discard(self, key: Key, settled: "asyncio.Future[D]") -> None:
        copies = self._copies.get(key)
        if copies is not None:
            copies[:] = [copy for copy in copies if copy.settled is not settled]

    def prefetch(self, max_size: int, channel: Any) -> int:
        """The prefetch of `channel`: max_size, less the runs whose delivery's channel closed
        (they keep their slots), plus the copies kept aside on this one (they take no slot); at least
        1 (RabbitMQ reads 0 as no limit)."""
        elsewhere = sum(1 for delivery in self._runs.values() if not is_open(delivery.channel))
        kept = sum(
            1 for copies in self._copies.values() for copy in copies if copy.delivery.channel is channel
        )
        return max(1, max_size - elsewhere + kept)


class Prefetch:
    """The consuming channel's prefetch: all slots, less the runs still going on a closed channel
    (they keep theirs), plus the copies kept aside on it. Only a channel-wide (`shared`) limit
    can change in place; a consumer's own is fixed when it starts: all slots, then."""

    def __init__(self, redeliveries: Redeliveries, max_size: int, shared: bool) -> None:
        self.redeliveries = redeliveries
        self.max_size = max_size
        self.shared = shared
        self.value = max_size

    async def apply(self, channel: Any, new: bool = False) -> None:
        """Set it on `channel` (`new`: a channel just opened), if it changed."""
        wanted = self.redeliveries.prefetch(self.max_size, channel) if self.shared else self.max_size
        if new or wanted != self.value:
            self.value = wanted
            await channel.basic_qos(prefetch_count=wanted, connection_global=self.shared)


def lock_holder(ours: bool) -> str:
    """Who holds the lock a claim found taken, as the log says it. A copy of a run of ours never
    claims (it is kept aside): ours is the lock of an earlier run of the same task id."""
    return "this worker, which runs an earlier run of it" if ours else "another worker"


async def keep_prefetch(redeliveries: Redeliveries, apply: Callable[[], Awaitable[None]]) -> None:
    """Apply the prefetch again whenever it may have changed (a background loop of the worker)."""
    while True:
        await redeliveries.changed.wait()
        redeliveries.changed.clear()
        try:
            await apply()
        except Exception as exc:  # a closing channel: the next one starts from the right value
            logger.debug("could not change the prefetch: %r", exc)
