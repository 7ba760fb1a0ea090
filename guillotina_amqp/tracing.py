"""OpenTelemetry spans that follow a task from the request that scheduled it to its run.

`add_task` runs its publish inside a `publish` span and sends the W3C trace context
(`traceparent`, `tracestate`) in the message's headers; the worker runs the task inside a
`run` span, a child of that publish span (retries too: the delay queue keeps the headers).

Optional (`pip install guillotina_amqp[otel]`), and free when unused: OpenTelemetry is never
imported here. Tracing is on once the application has imported OpenTelemetry's API and set a
tracer provider (the SDK's, or an auto-instrumentation's); until then every hook returns at
once. The provider is looked up at most once a second (OpenTelemetry's lookup reads the
environment: a few microseconds a task); `refresh()` makes a provider just set count at once.
"""

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Mapping

if TYPE_CHECKING:
    from guillotina_amqp.job import Job, Outcome

#: the instrumentation's name, as trace back-ends show it
TRACER_NAME = "guillotina_amqp"
#: attribute names of the spans
TASK_ID, FUNCTION, RUN, RETRIES, STATUS = (
    f"guillotina_amqp.task.{n}" for n in ("id", "function", "run", "retries", "status")
)
#: outcomes of a run that are failures (the span's status is ERROR)
_FAILED = frozenset({"errored", "failed"})
#: what a hook returns while tracing is off: no span, no headers
_OFF: ContextManager[Any] = contextlib.nullcontext()
#: seconds a provider lookup is trusted
RECHECK_AFTER = 1.0
#: [the tracer (None: tracing off), the provider it came from, when to look again (monotonic)]
_current: list[Any] = [None, None, 0.0]


def refresh() -> None:
    """Look up the tracer provider again at the next hook (call it after setting one)."""
    _current[2] = 0.0


def _tracer() -> Any:
    """The tracer of the configured provider; None while the application traces nothing."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None  # OpenTelemetry was never imported: nobody can have configured it
    tracer, known, recheck_at = _current
    now = time.monotonic()
    if now < recheck_at:
        return tracer
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        tracer = None  # imported, but no provider set: its spans would be dropped anyway
    elif provider is not known or tracer is None:
        tracer = provider.get_tracer(TRACER_NAME)
    _current[:] = [tracer, provider, now + RECHECK_AFTER]
    return tracer


def publish_span(task_id: str, function: str, run: str) -> ContextManager[dict[str, str] | None]:
    """`with publish_span(...) as headers`: the publish, traced; `headers` (None when tracing is
    off) carry the trace context to the worker."""
    tracer = _tracer()
    if tracer is None:
        return _OFF
    return _publishing(tracer, {TASK_ID: task_id, FUNCTION: function, RUN: run})


@contextlib.contextmanager
def _publishing(tracer: Any, attributes: dict[str, Any]) -> Iterator[dict[str, str]]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER, attributes=attributes):
        headers: dict[str, str] = {}
        propagate.inject(headers)  # traceparent, tracestate
        yield headers


def run_span(job: "Job", headers: Mapping[str, Any] | None) -> ContextManager[Any]:
    """`with run_span(job, headers) as span`: the run, traced as a child of the span whose
    context `headers` carry (the current one without); `span` is None when tracing is off."""
    tracer = _tracer()
    if tracer is None:
        return _OFF
    return _running(tracer, job, headers)


@contextlib.contextmanager
def _running(tracer: Any, job: "Job", headers: Mapping[str, Any] | None) -> Iterator[Any]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    parent = propagate.extract({k: v for k, v in (headers or {}).items() if isinstance(v, str)})
    attributes = {TASK_ID: job.task_id, FUNCTION: job.dotted_name, RUN: job.run_id, RETRIES: job.retries}
    with tracer.start_as_current_span(
        "run", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


def ended(span: Any, job: "Job", outcome: "Outcome") -> None:
    """Record how the run ended on its span (nothing when tracing is off)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(STATUS, outcome.value)
    if outcome.value in _FAILED:
        if job.exception is not None:
            span.record_exception(job.exception)
        span.set_status(Status(StatusCode.ERROR, type(job.exception).__name__ if job.exception else None))
