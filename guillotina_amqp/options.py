"""The per-task options, each declared once (docs/tasks.md#options).

An entry of `TaskOptions` is one option: the message field it travels as (name and type),
add_task's keyword(s) that give it, whether `@task(...)` takes it, and its checks at the call
and in a decoded message. add_task, `@task` and the worker's message checks all read `TABLE`,
so a new option is one entry here plus its behaviour. Bad input raises ValueError naming the
option as the caller spelled it, before anything is published.
"""

import inspect
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Callable, TypedDict, get_type_hints

from guillotina_amqp import control, expiry, names, offload, timing

#: add_task's values of an option, by keyword as the caller spelled it, and the task's function
#: (None while @task has none yet) -> the field's value, None when unset
Given = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True)
class Option:
    """How an option is given and checked; its field's name and type are its TaskOptions entry."""

    #: add_task's keyword(s) and the types they take (the signature help(add_task) shows)
    call: dict[str, Any]
    #: the call's (or @task's) values -> the field's value; ValueError naming the keyword
    given: Given
    #: a decoded message's value of the field, told by its name: ValueError saying what is wrong
    check: Callable[[Any, str], Any]
    #: `@task(<field>=...)` takes it too: checked at definition, given to every call
    on_task: bool = True


def _named(check: Callable[[Any, str], Any]) -> Given:
    """An option given by one keyword, whose check names it: `check(value, keyword)`."""

    def given(values: dict[str, Any], func: Any) -> Any:
        ((name, value),) = values.items()
        return check(value, name)

    return given


def _plain(normalise: Callable[..., Any]) -> Given:
    """An option whose check names its keywords itself: `normalise(*values)`, in `call`'s order."""
    return lambda values, func: normalise(*values.values())


def _string(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")


class TaskOptions(TypedDict, total=False):
    """The options as message fields, present only when the task or the call set them; the
    call overrides the decorator, the decorator the `amqp` settings (docs/tasks.md#options)."""

    #: seconds a run may last (docs/tasks.md#time-limits-and-retry-limits)
    timeout: Annotated[
        float, Option({"_timeout": float | None}, _named(control.check_timeout), control.check_timeout)
    ]
    #: retries after the first run
    max_retries: Annotated[
        int,
        Option({"_max_retries": int | None}, _named(control.check_max_retries), control.check_max_retries),
    ]
    #: 0..9, higher first (docs/tasks.md#priorities); quorum queues refuse it (add_task)
    priority: Annotated[
        int, Option({"_priority": int | None}, _named(control.check_priority), control.check_priority)
    ]
    #: not started by this epoch second, never (docs/tasks.md#expiry)
    expires: Annotated[
        float, Option({"_expires": float | datetime | None}, _plain(expiry.deadline), expiry.check_field)
    ]
    #: where a plain `def` runs (docs/tasks.md#plain-def-functions-off-the-loop); checked
    #: against the function once there is one
    run_in: Annotated[
        str,
        Option(
            {"_run_in": str | None},
            lambda values, func: offload.check_run_in(func, *values.values()) if func else None,
            offload.check_field,
        ),
    ]
    #: not started before this epoch second (docs/tasks.md#start-later-countdown-and-eta)
    eta: Annotated[
        float,
        Option(
            {"_countdown": float | None, "_eta": datetime | float | None},
            _plain(timing.start_at),
            timing.check_eta,
            on_task=False,
        ),
    ]
    #: a named queue it is sent to (docs/tasks.md#named-queues); absent: amqp.queue (add_task)
    queue: Annotated[str, Option({"_queue": str | None}, _plain(names.named_queue), _string)]


#: field -> its Option, in the order they are checked and written into a message
TABLE: dict[str, Option] = {
    field: hint.__metadata__[0] for field, hint in get_type_hints(TaskOptions, include_extras=True).items()
}
#: what `@task(...)` takes
ON_TASK = tuple(field for field, option in TABLE.items() if option.on_task)


def from_call(func: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The fields of the options among add_task's `kwargs` (taken out of them: the rest are
    the task's), checked and normalised; only those that are set."""
    fields = {}
    for field, option in TABLE.items():
        value = option.given({name: kwargs.pop(name, None) for name in option.call}, func)
        if value is not None:
            fields[field] = value
    return fields


def on_task(func: Any, options: dict[str, Any]) -> dict[str, Any]:
    """`@task(...)`'s options, checked, as the add_task keywords every call defaults to.

    `func` is None while the decorator has no function yet. ValueError naming an unknown or bad one.
    """
    unknown = sorted(set(options) - set(ON_TASK))
    if unknown:
        raise ValueError(f"unknown task option {unknown[0]!r} (known: {', '.join(ON_TASK)})")
    defaults = {}
    for field in ON_TASK:
        if options.get(field) is not None:
            TABLE[field].given({field: options[field]}, func)
            (keyword,) = TABLE[field].call
            defaults[keyword] = options[field]
    return defaults


def check_fields(message: dict) -> None:
    """ValueError saying which option field of a decoded message is bad (an absent one is not)."""
    for field, option in TABLE.items():
        if field in message:
            option.check(message[field], f"'{field}'")


def signature(add_task: Callable[..., Any]) -> inspect.Signature:
    """add_task's signature with every option's keywords, for help() and inspect."""
    base = inspect.signature(add_task)
    *named, rest = base.parameters.values()  # rest: add_task's **kwargs, the task's own
    keywords = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for option in TABLE.values()
        for name, annotation in option.call.items()
    ]
    return base.replace(parameters=[*named, *keywords, rest])
