"""Redis servers that want credentials, and one that speaks TLS only, for the whole test session.

Loaded as a pytest plugin (conftest). Each server is started by the first test that asks for
its fixture and stopped at the end of the session (or with the test process: PDEATHSIG).
Their ports are the first two free ones of 6393-6399 (6391 and 6392 are the HA tests'), so
that two test runs on one machine each get theirs.
"""

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the ports these servers may take (the range the project keeps for them)
PORTS = range(6393, 6400)


def _free_ports(count: int) -> list[int]:
    free = []
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == count:
            return free
    raise RuntimeError(f"no {count} free ports in {PORTS.start}-{PORTS.stop - 1} for the test Redis servers")


#: password and ACL user; TLS only, with a password and a client certificate; a Sentinel that
#: watches the first as its master
AUTH_PORT, TLS_PORT, SENTINEL_PORT = _free_ports(3)
SENTINEL_MASTER = "secure-master"
#: random per run, so a test can look for them anywhere they must not be
PASSWORD = f"pw-{uuid.uuid4().hex}"
USERNAME = "tasks"
USER_PASSWORD = f"user-pw-{uuid.uuid4().hex}"
#: where scripts/make-certs.sh writes the session's certificates
CERTS = Path(f"/tmp/guillotina-amqp-certs-{uuid.uuid4().hex[:8]}")


def redis_block(port: int, **settings: object) -> dict:
    return {"host": "127.0.0.1", "port": port, **settings}


def tls_block(**settings: object) -> dict:
    """The TLS server's settings: its password, the test CA, this client's certificate."""
    block = redis_block(TLS_PORT, password=PASSWORD, ssl=True, ssl_ca_certs=str(CERTS / "ca.pem"))
    block |= {"ssl_certfile": str(CERTS / "client.pem"), "ssl_keyfile": str(CERTS / "client.key")}
    return block | settings


def _die_with_parent() -> None:
    # a test process killed outright must not leave its servers holding the ports
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def _server(port: int, directory: Path, *args: str, config: Path | None = None) -> Iterator[subprocess.Popen]:
    assert not _port_answers(port), f"port {port} is taken: another redis-server of the tests still runs?"
    directory.mkdir(parents=True, exist_ok=True)
    command = ["redis-server", *([str(config)] if config else [])]
    command += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory), *args]
    with open(directory / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 30
        while not _port_answers(port):
            assert process.poll() is None, (directory / "server.log").read_text()
            assert time.monotonic() < deadline, f"redis-server on {port} did not start"
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def certificates() -> Iterator[Path]:
    subprocess.run(["bash", str(ROOT / "scripts" / "make-certs.sh"), str(CERTS)], check=True)
    try:
        yield CERTS
    finally:
        subprocess.run(["rm", "-rf", str(CERTS)], check=False)


@pytest.fixture(scope="session")
def auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server that wants PASSWORD (user `default`) or USERNAME/USER_PASSWORD (ACL)."""
    acl_user = ["--user", USERNAME, "on", f">{USER_PASSWORD}", "~*", "&*", "+@all"]
    with _server(
        AUTH_PORT,
        tmp_path_factory.mktemp("auth-redis"),
        "--port",
        str(AUTH_PORT),
        "--requirepass",
        PASSWORD,
        *acl_user,
    ):
        yield AUTH_PORT


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certificates: Path) -> Iterator[int]:
    """A redis-server on TLS only, that wants PASSWORD and a client certificate of the test CA."""
    tls = [
        "--tls-cert-file",
        str(certificates / "server.pem"),
        "--tls-key-file",
        str(certificates / "server.key"),
    ]
    tls += ["--tls-ca-cert-file", str(certificates / "ca.pem"), "--tls-auth-clients", "yes"]
    ports = ["--port", "0", "--tls-port", str(TLS_PORT)]
    with _server(TLS_PORT, tmp_path_factory.mktemp("tls-redis"), *ports, *tls, "--requirepass", PASSWORD):
        yield TLS_PORT


@pytest.fixture(scope="session")
def sentinel_redis(tmp_path_factory: pytest.TempPathFactory, auth_redis: int) -> Iterator[int]:
    """A Sentinel watching the password server as SENTINEL_MASTER (it knows the password)."""
    directory = tmp_path_factory.mktemp("sentinel")
    # Sentinel rewrites its file with what it learns: one of its own
    config = directory / "sentinel.conf"
    config.write_text(
        f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {auth_redis} 1\n"
        f"sentinel auth-pass {SENTINEL_MASTER} {PASSWORD}\n"
    )
    with _server(SENTINEL_PORT, directory, "--port", str(SENTINEL_PORT), "--sentinel", config=config):
        yield SENTINEL_PORT
