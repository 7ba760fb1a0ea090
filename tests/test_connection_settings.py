"""The settings of production connections: the `redis` block's credentials and TLS, `amqp.ssl`.

Read as their types from text (the environment), refused with the setting's name (never a
secret's value), and a TLS setting that cannot be honoured is an error, never plain TCP.
"""

import pytest
from guillotina import app_settings

from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.exceptions import InvalidSettings
from guillotina_amqp.settings import TLSSettings, get_redis_settings, parse
from guillotina_amqp.state import redis_client
from tests.subprocess_worker import worker_config
from tests.test_settings_errors import assert_one_clear_line, failed_start

SECRET = "pw-in-a-url-secret"


def redis_settings(monkeypatch, **block: object):
    monkeypatch.setitem(app_settings, "redis", block)
    return get_redis_settings()


def test_the_redis_block_is_read_as_its_types_from_text(monkeypatch):
    # what guillotina reads from G_REDIS__DB=2, G_REDIS__SSL=true...
    settings = redis_settings(monkeypatch, host="cache", port="6380", db="2", ssl="true", password=SECRET)
    assert (settings.host, settings.port, settings.db, settings.ssl) == ("cache", 6380, 2, True)
    assert settings.ssl_cert_reqs == "required"  # certificates are checked unless told otherwise
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    "block, named",
    [
        ({"db": "two"}, "redis.db"),
        ({"ssl_cert_reqs": "sometimes"}, "redis.ssl_cert_reqs"),
        ({"password": ""}, "redis.password"),
        ({"url": f"http://:{SECRET}@cache:6379"}, "redis.url"),
        ({"sentinels": "cache:26379"}, "redis.sentinels"),
    ],
)
def test_bad_redis_settings_are_refused_naming_the_setting_not_the_secret(monkeypatch, block, named):
    with pytest.raises(InvalidSettings, match=named) as raised:
        redis_settings(monkeypatch, **block)
    assert SECRET not in str(raised.value)


def test_a_url_says_where_and_how_and_the_error_messages_show_no_password(monkeypatch):
    url = f"rediss://tasks:{SECRET}@cache.example:6380/4"
    redis_settings(monkeypatch, host="ignored", port=1, url=url, ssl_ca_certs="/ca.pem")
    client = redis_client.client()
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"]) == ("cache.example", 6380, 4)
    assert (options["username"], options["password"]) == ("tasks", SECRET)
    assert options["ssl_ca_certs"] == "/ca.pem"
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert redis_client.where() == "rediss://cache.example:6380/4 (redis.url)"
    assert SECRET not in redis_client.describe_failure(ConnectionError("refused"))


def test_the_sentinel_path_logs_in_and_speaks_tls_as_the_block_says(monkeypatch):
    redis_settings(
        monkeypatch, sentinels=["127.0.0.1:26379"], master_name="m", password=SECRET, db=3, ssl=True
    )
    pool = redis_client.client().connection_pool
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == (SECRET, 3)
    assert "SSL" in pool.connection_class.__name__
    assert SECRET not in redis_client.where()


@pytest.mark.parametrize(
    "given, read",
    [
        (None, None),
        (False, None),
        ("false", None),
        (True, TLSSettings()),
        ("true", TLSSettings()),
        ({"cafile": "/ca.pem", "verify": "false"}, TLSSettings(cafile="/ca.pem", verify=False)),
        ('{"server_hostname": "rabbit.internal"}', TLSSettings(server_hostname="rabbit.internal")),
    ],
)
def test_amqp_ssl_is_off_true_or_a_block(given, read):
    assert parse({"ssl": given}).ssl == read


@pytest.mark.parametrize("given", [3, "yes", {"verify": "maybe"}])
def test_a_bad_amqp_ssl_is_refused_naming_it(given):
    with pytest.raises(InvalidSettings, match="amqp.ssl"):
        parse({"ssl": given})


async def _plain_factory(host: str, port: int, login: str, password: str, virtualhost: str) -> None:
    raise AssertionError("never called: it would connect without TLS")


async def test_a_connection_factory_that_cannot_take_ssl_is_refused_not_used_without_it():
    settings = parse({"ssl": True, "connection_factory": _plain_factory})
    with pytest.raises(InvalidSettings, match="amqp.ssl"):
        await AMQPConnection(settings).open(max_time=1)


async def test_a_missing_ca_file_stops_the_worker_with_one_line(guillotina_main):
    code, output = await failed_start(worker_config(ssl={"cafile": "/nonexistent/ca.pem"}))
    assert code != 0, output
    assert_one_clear_line(output, ["amqp.ssl.cafile", "No such file"])
