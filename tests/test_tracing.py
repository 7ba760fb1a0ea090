"""OpenTelemetry: one trace from the request that schedules a task to the worker that runs it.

Spans are collected by the SDK's in-memory exporter; the worker runs in the test's process.
"""

import subprocess
import sys
from typing import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from guillotina_amqp import add_task, tracing
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.utils import running_worker, wait_for


@pytest.fixture
def spans(monkeypatch) -> Iterator[InMemorySpanExporter]:
    """Finished spans of this test. OpenTelemetry lets a process set its provider once: the
    test's provider stands in for the global one for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    tracing.refresh()
    yield exporter
    monkeypatch.undo()
    tracing.refresh()


async def finished(spans: InMemorySpanExporter, *names: str) -> dict:
    """The finished spans by name, once every one of `names` has ended."""

    def found() -> dict:
        by_name = {span.name: span for span in spans.get_finished_spans()}
        return by_name if set(names) <= set(by_name) else {}

    return await wait_for(found, 60, f"spans {names}")


async def test_one_trace_holds_the_request_the_publish_and_the_run(spans, worker):
    with trace.get_tracer("tests").start_as_current_span("request"):
        state = await add_task(app.add, 1, 2)
    assert (await state.join())["status"] == TaskStatus.FINISHED

    found = await finished(spans, "request", "publish", "run")
    request, publish, run = found["request"], found["publish"], found["run"]
    assert {span.context.trace_id for span in (request, publish, run)} == {request.context.trace_id}
    assert publish.parent.span_id == request.context.span_id
    assert run.parent.span_id == publish.context.span_id
    assert run.parent.is_remote, "the run's parent came through the message's headers"
    assert (publish.kind, run.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert run.attributes[tracing.TASK_ID] == publish.attributes[tracing.TASK_ID] == state.task_id
    assert run.attributes[tracing.FUNCTION] == "tests.app.add"
    assert run.attributes[tracing.RUN] == publish.attributes[tracing.RUN] != ""
    assert run.attributes[tracing.RETRIES] == 0
    assert run.attributes[tracing.STATUS] == "finished"
    assert run.status.status_code is StatusCode.UNSET


@pytest.mark.app_settings({"amqp": {"eager": True, "port": 1}})
async def test_an_eager_run_is_traced_as_a_child_of_its_publish(spans, guillotina_main):
    state = await add_task(app.add, 1, 2)
    assert (await state.join(timeout=30))["status"] == TaskStatus.FINISHED
    found = await finished(spans, "publish", "run")
    assert found["run"].parent.span_id == found["publish"].context.span_id


async def test_a_failed_run_records_its_error_and_each_retry_is_a_child_of_the_publish(
    spans, guillotina_main
):
    async with running_worker(max_size=1) as worker:
        worker.max_task_retries = 1
        state = await add_task(app.fail, "traced boom")
        assert (await state.join())["status"] == TaskStatus.ERRORED

        def runs() -> list:
            return [span for span in spans.get_finished_spans() if span.name == "run"]

        await wait_for(lambda: len(runs()) == 2, 60, "a run span for the run and for its retry")
    publish = (await finished(spans, "publish"))["publish"]
    assert [span.parent.span_id for span in runs()] == [publish.context.span_id] * 2
    assert [span.attributes[tracing.RETRIES] for span in runs()] == [0, 1]
    for span in runs():
        assert span.attributes[tracing.STATUS] == "errored"
        assert span.status.status_code is StatusCode.ERROR
        (event,) = [event for event in span.events if event.name == "exception"]
        assert "traced boom" in event.attributes["exception.message"]


async def test_no_span_and_no_trace_header_without_a_tracer_provider(guillotina_main):
    # OpenTelemetry is imported (by this module) but no provider is set: nothing is traced
    tracing.refresh()
    with tracing.publish_span("id", "f", "run") as headers:
        assert headers is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


async def test_a_provider_set_later_is_used_within_a_second(monkeypatch, guillotina_main):
    tracing.refresh()
    with tracing.publish_span("id", "f", "run") as headers:
        assert headers is None  # no provider yet: looked up, and trusted for a second
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider())

    def traced() -> bool:
        with tracing.publish_span("id", "f", "run") as headers:
            return bool(headers and "traceparent" in headers)

    await wait_for(traced, 10, "the provider set meanwhile")
    monkeypatch.undo()
    tracing.refresh()


NO_OPENTELEMETRY = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, NotInstalled())
import guillotina_amqp, guillotina_amqp.worker, guillotina_amqp.commands.worker
from guillotina_amqp import tracing

with tracing.publish_span("id", "f", "run") as headers:
    assert headers is None
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_without_the_extra_the_add_on_imports_and_traces_nothing():
    # (with the extra installed, redis-py 8 imports OpenTelemetry's SDK itself, whoever asks)
    done = subprocess.run(
        [sys.executable, "-c", NO_OPENTELEMETRY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


INSTALLED_BUT_OFF = """
import sys

import redis  # redis-py 8 imports OpenTelemetry's SDK itself when it is installed

theirs = {name for name in sys.modules if name.startswith("opentelemetry")}
assert "opentelemetry.sdk" in theirs, sorted(theirs)
import guillotina_amqp, guillotina_amqp.worker, guillotina_amqp.commands.worker, guillotina_amqp.utils
from guillotina_amqp import tracing

with tracing.publish_span("id", "f", "run") as headers, tracing.run_span(None, {}) as span:
    assert headers is None and span is None
tracing.ended(span, None, None)
print(sorted(name for name in sys.modules if name.startswith("opentelemetry") and name not in theirs))
"""


def test_with_the_extra_but_no_provider_the_add_on_imports_nothing_more():
    # what redis-py imports is its own (docs/production.md#tracing-opentelemetry): nothing
    # of the publish and run hooks (propagate, the SDK's trace) is loaded while nothing traces
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED_BUT_OFF], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
