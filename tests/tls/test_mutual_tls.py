"""Mutual TLS on a real node: mtls@localhost of scripts/tls-engines.sh requires a client
certificate signed by the test CA (RabbitMQ's `ssl_options.fail_if_no_peer_cert`).

A certificate the broker refuses, or none where it wants one, stays refused however often it
is tried: the worker stops with one line naming `amqp.ssl.certfile`, and add_task raises at
once, as a certificate of the broker's that we refuse does (tests/tls/test_amqps.py).
"""

import ssl

import aioamqp
import pytest

from guillotina_amqp import add_task, tls
from guillotina_amqp.exceptions import TLSFailure
from guillotina_amqp.settings import TLSSettings
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.test_settings_errors import assert_one_clear_line, failed_start
from tests.tls.nodes import MUTUAL, MUTUAL_PORT, PASSWORD, TRUSTED, client_certificate

pytestmark = pytest.mark.usefixtures("outside_container")

WITH_CLIENT_CERTIFICATE = {**MUTUAL, "ssl": client_certificate("client")}
CONNECT_FAILED = "could not connect to RabbitMQ"
REFUSALS = {
    "none": (
        TRUSTED,
        ["RabbitMQ requires a client certificate", "amqp.ssl.certfile", "certificate required"],
    ),
    "untrusted": (
        client_certificate("untrusted"),
        ["refused the client certificate of amqp.ssl.certfile", "unknown ca"],
    ),
}


@pytest.mark.app_settings({"amqp": WITH_CLIENT_CERTIFICATE})
async def test_a_task_runs_end_to_end_with_a_client_certificate(guillotina_main):
    async with WorkerProcess(worker_config()) as worker:
        await worker.wait_consuming()
        state = await add_task(app.add, 2, 3)  # published by this process, showing its certificate
        final = await state.join(timeout=120)
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 5, worker.output
    assert f"Connected to RabbitMQ at 127.0.0.1:{MUTUAL_PORT}" in worker.output


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refused_client_certificate_stops_the_worker_with_one_line(guillotina_main, case):
    shown, reason = REFUSALS[case]
    code, output = await failed_start(worker_config(**{**MUTUAL, "ssl": shown}))
    assert code != 0, output
    assert_one_clear_line(output, ["TLS to RabbitMQ", f"127.0.0.1:{MUTUAL_PORT}", *reason])
    assert output.count(CONNECT_FAILED) == 1, "a refused certificate is tried once, not again"
    assert "Backing off" not in output and "Giving up" not in output, output
    assert PASSWORD not in output


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.app_settings({"amqp": {**MUTUAL, "ssl": shown}}))
        for case, (shown, _) in sorted(REFUSALS.items())
    ],
)
async def test_add_task_raises_at_once_when_its_certificate_is_refused(guillotina_main, info_logs, case):
    with pytest.raises(TLSFailure) as refused:
        await add_task(app.add, 1, 1)
    for part in REFUSALS[case][1]:
        assert part in str(refused.value)
    assert info_logs.text.count(CONNECT_FAILED) == 1, info_logs.text
    assert "retrying" not in info_logs.text


@pytest.mark.parametrize("shown, refused", [(TRUSTED, True), (client_certificate("client"), False)])
async def test_a_reset_after_the_handshake_is_told_apart_by_asking_again(shown, refused):
    # with TLS 1.3 the broker's alert is often lost to the reset of the AMQP header it did not
    # read: the attempt fails as a reset connection, and asking again finds out why
    context = tls.client_context(TLSSettings(**shown))
    try:
        raise aioamqp.AmqpClosedConnection() from ConnectionResetError(104, "Connection reset by peer")
    except aioamqp.AmqpClosedConnection as exc:
        found = await tls.failure_behind(exc, "127.0.0.1", MUTUAL_PORT, context)
    if refused:
        assert isinstance(found, ssl.SSLError) and found.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    else:
        assert found is None, "a broker that accepted the certificate waits for the AMQP header"
