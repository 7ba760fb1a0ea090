"""The `amqp` settings read as their declared types, checked once, wherever they are used.

Values arrive as YAML types from a configuration file, and as strings from the
environment (`G_AMQP__PORT=5673`) or `--override`: each comes out as the type
`AMQPSettings` declares, or stops the reader with an error naming the setting
(and the variable) without echoing a secret.
"""

from typing import Any

import pytest
from guillotina import app_settings

import guillotina_amqp
from guillotina_amqp import add_task, settings
from guillotina_amqp.commands.worker import DEFAULT_METRICS_PORT, metrics_port
from guillotina_amqp.exceptions import InvalidSettings
from guillotina_amqp.settings import DEFAULTS, AMQPSettings, coerce, get_settings, parse
from guillotina_amqp.worker import Worker
from tests import app
from tests.subprocess_worker import env_text
from tests.utils import queue_counts

STRINGS = tuple[str, ...]

READ = [
    ("3", int, 3),
    (" 3 ", int, 3),
    (7, int, 7),
    ("1.5", float, 1.5),
    ("30", float, 30.0),
    ("none", int | None, None),
    ("NULL", str | None, None),
    (None, int | None, None),
    ("4", int | None, 4),
    ("true", bool, True),
    ("False", bool, False),
    ('["a", "b"]', STRINGS, ("a", "b")),
    (["a"], STRINGS, ("a",)),
    ("[]", STRINGS, ()),
    ("none", STRINGS | None, None),
    ('{"allowed": ["http://h:80"]}', dict, {"allowed": ["http://h:80"]}),
    (1234, str, "1234"),  # YAML reads `password: 1234` as a number
    ("none", str, "none"),  # only where None is a value does the word mean None
]

REFUSED = [
    ("three", int, "an integer"),
    ("", int, "an integer"),
    ("3.5", int, "an integer"),
    (True, int, "an integer"),  # YAML `port: yes`
    ("none", int, "an integer"),
    ("x", int | None, "an integer or none"),
    ("soon", float, "a number"),
    ("yes", bool, "true or false"),
    (1, bool, "true or false"),
    ("a,b", STRINGS, "a list of non-empty strings"),
    ("old-key", STRINGS, "a list of non-empty strings"),  # never read as the items o, l, d...
    ('["a", ""]', STRINGS, "a list of non-empty strings"),
    ("[1]", STRINGS, "a list of non-empty strings"),
    ('["a"', STRINGS, "a list of non-empty strings"),
    ('"a"', STRINGS | None, "a list of non-empty strings (JSON in the environment) or none"),
    ("[1]", dict, "a JSON object"),
    (["a"], str, "a string"),
]


@pytest.mark.parametrize(("value", "kind", "expected"), READ)
def test_values_are_read_as_their_declared_type(value, kind, expected):
    read = coerce(value, kind)
    assert read == expected
    assert type(read) is type(expected)


@pytest.mark.parametrize(("value", "kind", "expected"), REFUSED)
def test_values_that_are_not_of_the_type_are_refused_saying_what_is_expected(value, kind, expected):
    with pytest.raises(ValueError, match="^must be " + expected.replace("(", r"\(").replace(")", r"\)")):
        coerce(value, kind)


def test_every_default_written_as_an_environment_variable_reads_back_as_itself():
    block = {name: env_text(value) for name, value in DEFAULTS.items()}
    assert all(isinstance(value, str) for value in block.values())
    assert parse(block) == AMQPSettings()


def test_defaults_are_declared_once_by_the_dataclass():
    assert AMQPSettings().max_message_bytes == DEFAULTS["max_message_bytes"] == 1048576
    assert AMQPSettings().max_eventlog == DEFAULTS["max_eventlog"] == 1000
    # the configuration's form: lists, not tuples (YAML and JSON write them)
    assert DEFAULTS["previous_signing_keys"] == []
    assert guillotina_amqp.app_settings["amqp"] == DEFAULTS
    assert guillotina_amqp.app_settings["amqp"] is not DEFAULTS


def test_connection_factory_is_a_dotted_name_or_the_callable_itself():
    async def connect(**kwargs: Any) -> None: ...

    assert parse({"connection_factory": connect}).connection_factory is connect
    assert parse({"connection_factory": "my.connect"}).connection_factory == "my.connect"
    with pytest.raises(InvalidSettings, match="^amqp.connection_factory must be a string or a callable"):
        parse({"connection_factory": ["my.connect"]})


def test_null_means_the_default_where_none_is_not_a_value():
    read = parse({"port": None, "previous_signing_keys": None, "max_task_retries": None})
    assert read.port == 5672
    assert read.previous_signing_keys == ()
    assert read.max_task_retries is None  # None is a value here: retry for ever


def test_an_error_names_the_setting_and_the_environment_variable_it_came_from(monkeypatch):
    with pytest.raises(InvalidSettings) as plain:
        parse({"max_task_retries": "three"})
    assert str(plain.value) == "amqp.max_task_retries must be an integer or none, not 'three'"

    monkeypatch.setenv("G_AMQP__MAX_TASK_RETRIES", "three")
    with pytest.raises(InvalidSettings) as from_env:
        parse({"max_task_retries": "three"})
    assert str(from_env.value).startswith(
        "amqp.max_task_retries (environment variable G_AMQP__MAX_TASK_RETRIES) must be an integer"
    )


@pytest.mark.parametrize(
    "block",
    [
        {"previous_signing_keys": "old-key-secret"},
        {"previous_signing_keys": ["old-key-secret", ""]},
        {"signing_key": ["new-key-secret"]},
        {"signing_key": ""},
        {"password": ["rabbit-key-secret"]},
    ],
)
def test_an_error_about_a_secret_never_shows_its_value(block):
    with pytest.raises(InvalidSettings) as error:
        parse(block)
    (name,) = block
    assert f"amqp.{name} must be" in str(error.value)
    assert "secret" not in str(error.value)


# -- in a running application --------------------------------------------------------------


async def test_app_settings_carry_every_default(guillotina_main):
    # conftest's block names only a few settings: guillotina merged it over the add-on's defaults
    block = app_settings["amqp"]
    assert set(DEFAULTS) <= set(block)
    assert block["max_message_bytes"] == 1048576
    assert block["max_eventlog"] == 1000
    assert block["state_ttl"] == 86400


async def test_a_worker_constructed_in_process_refuses_an_empty_previous_key(guillotina_main, monkeypatch):
    monkeypatch.setitem(app_settings, "amqp", {**app_settings["amqp"], "previous_signing_keys": [""]})
    with pytest.raises(InvalidSettings, match=r"^amqp\.previous_signing_keys must be a list of non-empty"):
        Worker()


async def test_add_task_with_bad_settings_raises_and_publishes_nothing(guillotina_main, monkeypatch):
    queue = get_settings().queue
    await queue_counts()  # declares this test's queues, to count them afterwards
    monkeypatch.setitem(app_settings, "amqp", {**app_settings["amqp"], "max_task_retries": "three"})
    with pytest.raises(InvalidSettings, match="amqp.max_task_retries"):
        await add_task(app.add, 1, 2)
    monkeypatch.undo()
    assert (await queue_counts())[queue] == 0


async def test_settings_are_read_once_and_again_when_the_block_changes(guillotina_main, monkeypatch):
    first = get_settings()
    assert get_settings() is first  # unchanged: not read and checked again

    block = {**app_settings["amqp"], "previous_signing_keys": ["one"]}
    monkeypatch.setitem(app_settings, "amqp", block)  # a new block
    assert get_settings().previous_signing_keys == ("one",)

    block["max_task_retries"] = "2"  # the same block, changed in place
    assert get_settings().max_task_retries == 2

    block["previous_signing_keys"].append("")  # a list inside it, changed in place
    with pytest.raises(InvalidSettings):
        get_settings()
    block["previous_signing_keys"][-1] = "two"
    assert get_settings().previous_signing_keys == ("one", "two")

    monkeypatch.setitem(app_settings, "redis_prefix_key", "other-")  # the top-level prefix
    assert get_settings().redis_prefix_key == "other-"


async def test_without_an_amqp_block_there_are_no_settings(guillotina_main, monkeypatch):
    monkeypatch.setitem(app_settings, "amqp", None)  # `amqp: null`, or the add-on not loaded
    assert not settings.is_configured()
    assert await add_task(app.add, 1, 2) is None


@pytest.mark.parametrize(
    ("flag", "configured", "port"),
    [(9100, 9200, 9100), (None, 9200, 9200), (None, "9300", 9300), (None, None, DEFAULT_METRICS_PORT)],
)
async def test_metrics_port_is_the_flag_then_the_configuration_port_then_8080(
    guillotina_main, monkeypatch, flag: Any, configured: Any, port: int
):
    monkeypatch.setitem(app_settings, "port", configured)
    assert metrics_port(flag) == port


async def test_a_configuration_port_that_is_not_a_number_is_refused_naming_it(guillotina_main, monkeypatch):
    monkeypatch.setitem(app_settings, "port", "eighty")
    monkeypatch.setenv("G_PORT", "eighty")
    with pytest.raises(InvalidSettings, match=r"^port \(environment variable G_PORT\) must be an integer"):
        metrics_port(None)
