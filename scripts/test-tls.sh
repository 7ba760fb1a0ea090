#!/usr/bin/env bash
# `make test-tls`: start the TLS RabbitMQ nodes (scripts/tls-engines.sh), run tests/tls, stop them
# again whatever happens (a failing test, Ctrl-C, a failed start).
set -euo pipefail
cd "$(dirname "$0")/.."
export TLS_DIR=${TLS_DIR:-/tmp/guillotina-amqp-tls}
trap 'bash scripts/tls-engines.sh stop' EXIT
trap 'exit 130' INT TERM
bash scripts/tls-engines.sh start
GUILLOTINA_AMQP_TLS=$TLS_DIR .venv/bin/pytest -p no:cacheprovider tests/tls "$@"
