#!/usr/bin/env bash
# `make test-tls`: start the TLS RabbitMQ nodes (scripts/tls-engines.sh), run tests/tls, stop them
# again whatever happens (a failing test, Ctrl-C, a failed start).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
export TLS_DIR=${TLS_DIR:-/tmp/guillotina-amqp-tls}
with_engines tls-engines.sh test-tls env GUILLOTINA_AMQP_TLS="$TLS_DIR" .venv/bin/pytest -p no:cacheprovider tests/tls "$@"
