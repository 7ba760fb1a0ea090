"""Which functions a worker may run, and turning a dotted name into one.

A message names its function by dotted name. Importing whatever a message
names would let anyone who can publish run `os.system`; the worker only
resolves functions registered with `@task`/`@object_task` or living under a
prefix of `amqp.allowed_tasks` (default: the configured applications).
"""

import importlib
from typing import Any, Callable

from guillotina import app_settings

from guillotina_amqp.exceptions import InvalidMessage, TaskNotAllowed
from guillotina_amqp.interfaces import ITaskDefinition
from guillotina_amqp.names import OBJECT_TASK_WRAPPERS
from guillotina_amqp.settings import AMQPSettings

_registered: dict[str, Callable[..., Any]] = {}
# (name, allowed prefixes) -> (module, attribute, object found there, function): a worker
# resolves the same few names for every message
_resolved: dict[tuple[str, tuple[str, ...]], tuple[Any, str, Any, Callable[..., Any]]] = {}


def dotted_name(func: Callable[..., Any]) -> str:
    """The name a message carries for `func`: module.function."""
    return f"{func.__module__}.{func.__name__}"


def register(func: Callable[..., Any]) -> str:
    """Allow `func` to run on workers; return its dotted name."""
    name = dotted_name(func)
    _registered[name] = func
    return name


def allowed_prefixes(settings: AMQPSettings) -> tuple[str, ...]:
    """amqp.allowed_tasks, or the configured applications but this one: its internals are not
    tasks (only its object-task wrappers are, allowed by name)."""
    if settings.allowed_tasks is not None:
        return tuple(settings.allowed_tasks)
    applications = app_settings.get("applications") or []
    return tuple(a for a in applications if isinstance(a, str) and a.split(".")[0] != "guillotina_amqp")


def is_allowed(name: str, settings: AMQPSettings) -> bool:
    if name in _registered or name in OBJECT_TASK_WRAPPERS:
        return True
    # a prefix must end on a dotted boundary: "app" allows "app.tasks.f", not "appx.f"
    return any(name == p or name.startswith(p.rstrip(".") + ".") for p in allowed_prefixes(settings))


def resolve(name: Any, settings: AMQPSettings) -> Callable[..., Any]:
    """The function named `name`; TaskNotAllowed/InvalidMessage when it may not or cannot run."""
    if not isinstance(name, str) or "." not in name:
        raise InvalidMessage(f"invalid function name {name!r}")
    if name in _registered:
        return _registered[name]
    prefixes = allowed_prefixes(settings)
    cached = _resolved.get((name, prefixes))
    if cached is not None and getattr(cached[0], cached[1], None) is cached[2]:
        return cached[3]  # checked before, and the module still holds the same object
    if not is_allowed(name, settings):
        raise TaskNotAllowed(f"function {name} is not a registered task nor under amqp.allowed_tasks")
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        found = func = getattr(module, attr)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise InvalidMessage(f"cannot import {name}: {exc}") from None
    if ITaskDefinition.providedBy(func):
        func = func.func
    if not callable(func):
        raise InvalidMessage(f"{name} is not callable")
    _check_origin(name, func, settings)
    _resolved[(name, prefixes)] = (module, attr, found, func)
    return func


def _check_origin(name: str, func: Any, settings: AMQPSettings) -> None:
    """Refuse a name that only re-exports a function defined elsewhere.

    `app.tasks.run` may be `subprocess.run` imported into an allowed module:
    the prefix test on the message's name alone would let it through.
    """
    if func in _registered.values():
        return
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", "")
    if not isinstance(module, str) or not is_allowed(f"{module}.{qualname}", settings):
        raise TaskNotAllowed(f"function {name} is {module}.{qualname}, which is not under amqp.allowed_tasks")
