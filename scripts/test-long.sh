#!/usr/bin/env bash
# `make test-long`: start the short-consumer_timeout RabbitMQ node (scripts/ct-engine.sh), run
# tests/long against it (Redis: the machine's own), stop it again whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
with_engines ct-engine.sh test-long \
    env RABBITMQ=127.0.0.1:5760 GUILLOTINA_AMQP_LONG=1 .venv/bin/pytest -p no:cacheprovider tests/long "$@"
