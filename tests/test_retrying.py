"""The one retry helper (guillotina_amqp/retrying.py): its pauses, its limits, what it logs."""

import logging

import pytest

from guillotina_amqp import connection, publishing, retrying
from guillotina_amqp.retrying import Attempts, Backoff, retry
from guillotina_amqp.state import redis


@pytest.fixture
def pauses(monkeypatch):
    """The pauses `retry` takes, without waiting them out."""
    taken: list[float] = []

    async def sleep(seconds: float) -> None:
        taken.append(seconds)

    monkeypatch.setattr(retrying.asyncio, "sleep", sleep)
    return taken


def failing(times: int, error: Exception | None = None):
    calls = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error or ConnectionError(f"failure {len(calls)}")
        return "done"

    call.calls = calls  # type: ignore[attr-defined]
    return call


async def test_pauses_double_up_to_the_cap_until_the_call_works(pauses):
    call = failing(5)
    assert await retry(call, Backoff(first=1, cap=5), (ConnectionError,)) == "done"
    assert pauses == [1, 2, 4, 5, 5]
    assert len(call.calls) == 6


async def test_fixed_pauses_and_full_jitter(pauses):
    await retry(failing(3), Backoff(first=0.5, doubling=False), (ConnectionError,))
    assert pauses == [0.5, 0.5, 0.5]
    pauses.clear()
    await retry(failing(20), Backoff(first=1, cap=4, jitter=True), (ConnectionError,))
    assert all(0 <= pause <= 4 for pause in pauses) and len(set(pauses)) > 1


async def test_max_tries_raises_the_last_error(pauses):
    call = failing(10)
    with pytest.raises(ConnectionError, match="failure 3"):
        await retry(call, Backoff(first=0.5, max_tries=3), (ConnectionError,))
    assert pauses == [0.5, 1.0]


async def test_max_time_bounds_the_pauses_and_the_attempts(pauses, monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(retrying.time, "monotonic", lambda: now[0])

    async def call() -> None:
        now[0] += 3  # each attempt takes 3 s
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await retry(call, Backoff(first=1, cap=4, max_time=10), (ConnectionError,))
    # (the pauses are not waited out) attempts start at 0, 3, 6, 9 and 12 s: the pause after
    # the fourth is what is left of the 10 s; the fifth, failing past them, is the last
    assert pauses == [1, 2, 4, 1]
    assert "Giving up call(...) after 5 tries" in caplog.text


async def test_other_errors_and_giveup_are_not_retried(pauses):
    with pytest.raises(ValueError):
        await retry(failing(1, ValueError("bug")), Backoff(first=1), (ConnectionError,))
    with pytest.raises(ConnectionError):
        await retry(failing(1), Backoff(first=1), (ConnectionError,), giveup=lambda exc: True)
    assert pauses == []


async def test_shared_attempts_count_against_the_same_limit(pauses):
    attempts = Attempts(Backoff(first=1, max_tries=3))
    assert await retry(failing(1), attempts, (ConnectionError,)) == "done"
    with pytest.raises(ConnectionError):
        await retry(failing(5), attempts, (ConnectionError,))
    assert attempts.tries == 3 and pauses == [1]


async def test_logs_each_retry_and_the_giving_up(pauses, caplog):
    async def reconnect() -> None:
        raise ConnectionError("refused")

    caplog.set_level(logging.INFO, "guillotina_amqp")
    with pytest.raises(ConnectionError):
        await retry(reconnect, Backoff(first=1, max_tries=2), (ConnectionError,))
    assert [r.getMessage() for r in caplog.records] == [
        "Backing off reconnect(...) for 1.0s (ConnectionError: refused)",
        "Giving up reconnect(...) after 2 tries (ConnectionError: refused)",
    ]


def test_the_policies_in_use():
    assert connection.RECONNECT == Backoff(first=1, cap=5, jitter=True)
    assert redis.REDIS_RETRY == Backoff(first=1, cap=4, jitter=True, max_time=30)
    assert redis.RESUBSCRIBE == Backoff(first=0.5, doubling=False)
    assert publishing.RETRY_PAUSE == 0.5
