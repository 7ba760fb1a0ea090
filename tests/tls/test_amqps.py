"""RabbitMQ over TLS (amqps) on a real node: tls@localhost of scripts/tls-engines.sh (tests/tls/nodes.py).

`make test-tls` starts the node (AMQPS on 5751, plain AMQP on 5750, certificates of the test
CA), runs this module and stops the node. The node's user `tasks` has a password made for the
run, so that the test can look for it where it must not be.
"""

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.exceptions import TLSFailure
from guillotina_amqp.settings import get_settings, parse
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.test_settings_errors import assert_one_clear_line, failed_start
from tests.tls.nodes import AMQPS_PORT, CERTS, OVER_TLS, PASSWORD, TRUSTED, client_certificate

pytestmark = pytest.mark.usefixtures("outside_container")


@pytest.mark.app_settings({"amqp": OVER_TLS})
async def test_a_task_runs_end_to_end_over_amqps(guillotina_main):
    async with WorkerProcess(worker_config()) as worker:
        await worker.wait_consuming()
        state = await add_task(app.add, 2, 3)  # published over TLS by this process
        final = await state.join(timeout=120)
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 5, worker.output
    assert f"Connected to RabbitMQ at 127.0.0.1:{AMQPS_PORT}" in worker.output
    assert PASSWORD not in worker.output
    assert PASSWORD not in str(final)


@pytest.mark.parametrize(
    "ssl, reason",
    [
        ({"cafile": str(CERTS / "untrusted-ca.pem")}, "does not verify against amqp.ssl.cafile"),
        # the system's CAs do not know the test CA either
        (True, "does not verify against the system's CAs"),
        ({**TRUSTED, "server_hostname": "other.example"}, "amqp.ssl.server_hostname"),
    ],
    ids=["untrusted-ca", "system-cas", "other-name"],
)
async def test_an_untrusted_certificate_stops_the_worker_with_one_line(guillotina_main, ssl, reason):
    code, output = await failed_start(worker_config(**{**OVER_TLS, "ssl": ssl}))
    assert code != 0, output
    assert_one_clear_line(
        output, ["TLS to RabbitMQ", f"127.0.0.1:{AMQPS_PORT}", "certificate does not verify", reason]
    )
    assert "Backing off" not in output, "a certificate that does not verify is not retried"
    assert PASSWORD not in output


async def test_a_plain_tcp_port_is_a_tls_failure_never_a_plain_connection(guillotina_main):
    settings = parse({**OVER_TLS, "port": 5750})  # the node's plain AMQP listener
    with pytest.raises(TLSFailure, match="amqp.ssl"):
        await AMQPConnection(settings).open(max_time=30)


async def test_the_name_checked_can_differ_from_the_host(guillotina_main):
    # connected by IP, the certificate checked against the name it carries
    settings = parse({**OVER_TLS, "ssl": {**TRUSTED, "server_hostname": "localhost"}})
    connection = AMQPConnection(settings)
    await connection.open(max_time=30)
    try:
        assert connection.is_open
    finally:
        await connection.close()


@pytest.mark.app_settings({"amqp": {**OVER_TLS, "hosts": ["127.0.0.1:1", f"localhost:{AMQPS_PORT}"]}})
async def test_every_failover_host_is_reached_over_tls(guillotina_main):
    # whichever host it tries first, the one that answers is reached with amqp.ssl
    connection = AMQPConnection(get_settings())
    await connection.open(max_time=60)
    try:
        assert connection.address == f"localhost:{AMQPS_PORT}/"
        assert connection.transport is not None
        assert connection.transport.get_extra_info("ssl_object") is not None
    finally:
        await connection.close()


@pytest.mark.parametrize("name, refused", [("client", False), ("untrusted", True)])
async def test_the_client_certificate_configured_is_the_one_shown(guillotina_main, name, refused):
    # the node checks a client certificate when one is shown: one it does not trust is refused
    connection = AMQPConnection(parse({**OVER_TLS, "ssl": client_certificate(name)}))
    if refused:
        with pytest.raises(TLSFailure, match="refused the client certificate of amqp.ssl.certfile"):
            await connection.open(max_time=60)
        return
    await connection.open(max_time=30)
    try:
        assert connection.is_open
    finally:
        await connection.close()
