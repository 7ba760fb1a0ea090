"""Which Redis the state manager talks to, and how it logs in there: the `redis` block.

guillotina.contrib.redis connects to `redis.host`:`redis.port` and nothing else (no
password, database or TLS), so the state manager makes its own client from every
setting of the block (settings.RedisSettings): `password`, `username`, `db`, `ssl`
and its files, or one `url`. Its pipelined connection, its listener and the index
use that client's settings. With `redis.sentinels` (a list of "host:port") the
client comes from redis-py's Sentinel support instead: every new connection asks
the Sentinels where the master `redis.master_name` is, and connections to a master
that died or was demoted fail, so the next attempt (the state manager retries for
about 30 s) reaches the promoted replica.
"""

import ssl
from typing import Any
from urllib.parse import urlsplit

from guillotina import app_settings
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import AuthenticationError, ResponseError

from guillotina_amqp.exceptions import InvalidSettings, StateManagerUnavailable
from guillotina_amqp.settings import RedisSettings, get_redis_settings, parse_address, setting_name

DEFAULT_MASTER_NAME = RedisSettings.master_name
#: seconds before a silent Redis or Sentinel counts as down (a failover must not hang us)
SOCKET_TIMEOUT = 5.0
#: replies of a server that refused our credentials (or got none)
_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR invalid password")


def uses_sentinel() -> bool:
    return bool(get_redis_settings().sentinels)


def sentinel_addresses(block: dict[str, Any]) -> list[tuple[str, int]]:
    """The Sentinels of a `redis` block, as (host, port); InvalidSettings naming the setting."""
    sentinels = block.get("sentinels")
    if isinstance(sentinels, str) or not isinstance(sentinels, (list, tuple)):
        raise InvalidSettings(f'redis.sentinels must be a list of "host:port" strings, not {sentinels!r}')
    return [parse_address(str(entry), None, "redis.sentinels") for entry in sentinels]


def check_configured() -> None:
    """StateManagerUnavailable when there is no `redis` block to connect by (nor Sentinels)."""
    if app_settings.get("redis") is None:
        raise StateManagerUnavailable(
            "amqp.persistent_manager='redis' needs 'guillotina.contrib.redis' in applications "
            "(and its 'redis' settings block), or redis.sentinels"
        )


def where() -> str:
    """Where the state lives, naming the settings that say so (for error messages: no secret)."""
    settings = get_redis_settings()
    if settings.sentinels:
        master, sentinels = settings.master_name, list(settings.sentinels)
        return f"master {master!r} of the Sentinels {sentinels} (redis.sentinels, redis.master_name)"
    if settings.url:
        return f"{_public_url(settings.url)} (redis.url)"
    return f"{settings.host}:{settings.port} (redis.host/redis.port)"


def _public_url(url: str) -> str:
    """`url` without its user name and password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="").geturl()


def client_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's connection arguments for `settings` (the url's parts win over the other keys)."""
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "db": settings.db}
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password
    if settings.uses_tls:
        options |= tls_options(settings)
    if settings.url:
        found = dict(parse_url(settings.url))
        # parse_url names the connection class; Redis() chooses it from `ssl` and `path`
        found.pop("connection_class", None)
        if "path" in found:  # unix://
            found["unix_socket_path"] = found.pop("path")
        options |= found
    return options


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "ssl": True,
        "ssl_ca_certs": settings.ssl_ca_certs,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
        "ssl_cert_reqs": settings.ssl_cert_reqs,
    }


def client(**overrides: Any) -> Redis:
    """A new client of the state's Redis (the current master, with Sentinels)."""
    settings = get_redis_settings()
    if settings.sentinels:
        return sentinel_client(settings, **overrides)
    return Redis(**client_options(settings), **overrides)


def sentinel_client(settings: RedisSettings, **overrides: Any) -> Redis:
    """A client of the current master, found through `redis.sentinels`; it logs in there as
    the block says. The Sentinels themselves are asked over TLS when the master is."""
    timeouts = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT}
    options = client_options(settings)
    for where in ("host", "port", "path"):
        options.pop(where, None)  # the Sentinels say where the master is
    sentinel_kwargs = {**timeouts, **(tls_options(settings) if settings.uses_tls else {})}
    sentinel = Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs, **timeouts)
    return sentinel.master_for(settings.master_name, **options, **overrides)


async def shared_client() -> Redis:
    """The client the state manager uses (its own: see the module's docstring)."""
    if not uses_sentinel():
        check_configured()
    return client()


def probe_client(timeout: float) -> Redis:
    """A separate client to check the state store is reachable, giving up after `timeout` s."""
    return client(socket_connect_timeout=timeout, socket_timeout=timeout)


def is_auth_error(exc: BaseException) -> bool:
    """Whether Redis refused our credentials (or wanted some): retrying would not help."""
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_AUTH_REPLIES)


def describe_failure(exc: BaseException) -> str:
    """Why the state store cannot be used, naming the settings to fix (never their values)."""
    settings = get_redis_settings()
    if is_auth_error(exc):
        names = ["redis.url"] if settings.url else [setting_name(("redis", "password"))]
        if settings.username and not settings.url:
            names.append(setting_name(("redis", "username")))
        return f"Redis at {where()} refused the credentials of {', '.join(names)}: {_reason(exc)}"
    if _is_tls_error(exc):
        files = "redis.ssl_ca_certs, redis.ssl_certfile, redis.ssl_keyfile, redis.ssl_cert_reqs"
        return f"TLS to Redis at {where()} failed ({files}): {_reason(exc)}"
    return f"cannot reach Redis, {where()}: {_reason(exc)}"


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    # redis-py's messages name the address and the server's reply, never the password we sent
    return str(exc) or type(exc).__name__
