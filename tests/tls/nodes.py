"""Where the RabbitMQ nodes of scripts/tls-engines.sh listen, and the certificates they trust.

`make test-tls` starts them: tls@localhost checks a client certificate when one is shown (AMQPS
5751), mtls@localhost requires one signed by the test CA (AMQPS 5753). The nodes' user `tasks`
has a password made for the run, so that the tests can look for it where it must not be.
"""

import os
from pathlib import Path

TLS_DIR = Path(os.environ.get("GUILLOTINA_AMQP_TLS", "/tmp/guillotina-amqp-tls"))
CERTS = TLS_DIR / "certs"
AMQPS_PORT = 5751
MUTUAL_PORT = 5753
PASSWORD = (TLS_DIR / "amqp-password").read_text().strip()
TRUSTED = {"cafile": str(CERTS / "ca.pem")}
#: the tls node's TLS listener, trusting the test CA (the host is an IP: its certificate names it too)
OVER_TLS = {"host": "127.0.0.1", "port": AMQPS_PORT, "login": "tasks", "password": PASSWORD, "ssl": TRUSTED}
#: the mtls node's, with no client certificate yet
MUTUAL = {**OVER_TLS, "port": MUTUAL_PORT}


def client_certificate(name: str) -> dict[str, str]:
    """`amqp.ssl` trusting the test CA and showing the certificate `name` of scripts/make-certs.sh
    (`client`: signed by the test CA; `untrusted`: by another CA)."""
    return {**TRUSTED, "certfile": str(CERTS / f"{name}.pem"), "keyfile": str(CERTS / f"{name}.key")}
