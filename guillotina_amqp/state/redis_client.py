"""Which Redis the state manager talks to: guillotina's client, or the master Sentinel names.

guillotina.contrib.redis connects to one `redis.host`:`redis.port` and nothing
else. With `redis.sentinels` (a list of "host:port") the state manager builds
its own client from redis-py's Sentinel support instead: every new connection
asks the Sentinels where the master `redis.master_name` is, and connections to
a master that died or was demoted fail, so the next attempt (the state manager
retries for about 30 s) reaches the promoted replica.
"""

from typing import Any

from guillotina import app_settings
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from guillotina_amqp.exceptions import InvalidSettings, StateManagerUnavailable

DEFAULT_MASTER_NAME = "mymaster"
#: seconds before a silent Redis or Sentinel counts as down (a failover must not hang us)
SOCKET_TIMEOUT = 5.0


def _block() -> dict[str, Any]:
    return app_settings.get("redis") or {}


def uses_sentinel() -> bool:
    return bool(_block().get("sentinels"))


def sentinel_addresses(block: dict[str, Any]) -> list[tuple[str, int]]:
    sentinels = block.get("sentinels")
    if isinstance(sentinels, str) or not isinstance(sentinels, list):
        raise InvalidSettings(f'redis.sentinels must be a list of "host:port" strings, not {sentinels!r}')
    addresses = []
    for entry in sentinels:
        host, _, port = str(entry).rpartition(":")
        if not host or not port.isdigit():
            raise InvalidSettings(f'redis.sentinels: {entry!r} is not "host:port"')
        addresses.append((host, int(port)))
    return addresses


def where() -> str:
    """Where the state lives, naming the settings that say so (for error messages)."""
    block = _block()
    if uses_sentinel():
        master = block.get("master_name", DEFAULT_MASTER_NAME)
        return f"master {master!r} of the Sentinels {block['sentinels']} (redis.sentinels, redis.master_name)"
    return f"{block.get('host')}:{block.get('port')} (redis.host/redis.port)"


def sentinel_client(**options: Any) -> Redis:
    """A client of the current master, found through `redis.sentinels`."""
    block = _block()
    sentinel = Sentinel(
        sentinel_addresses(block), socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
    )
    return sentinel.master_for(block.get("master_name", DEFAULT_MASTER_NAME), **options)


async def shared_client() -> Redis:
    """The client the state manager uses: its own one with Sentinels, else guillotina's."""
    if uses_sentinel():
        return sentinel_client()
    from guillotina.contrib import redis as contrib_redis

    if contrib_redis._driver is None:
        raise StateManagerUnavailable(
            "amqp.persistent_manager='redis' needs 'guillotina.contrib.redis' in applications "
            "(and its 'redis' settings block), or redis.sentinels"
        )
    driver = await contrib_redis.get_driver()
    return driver.pool


def probe_client(timeout: float) -> Redis:
    """A separate client to check the state store is reachable, giving up after `timeout` s
    (guillotina's driver retries for ever)."""
    if uses_sentinel():
        return sentinel_client(socket_connect_timeout=timeout)
    block = _block()
    return Redis(
        host=block.get("host", "localhost"), port=block.get("port", 6379), socket_connect_timeout=timeout
    )
