#!/usr/bin/env bash
# `make test-ha`: start the HA engines (scripts/ha-engines.sh), run tests/ha, stop them
# again whatever happens (a failing test, Ctrl-C, a failed start).
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'bash scripts/ha-engines.sh stop' EXIT
trap 'exit 130' INT TERM
started=$(date +%s)
bash scripts/ha-engines.sh start
GUILLOTINA_AMQP_HA=1 .venv/bin/pytest -p no:cacheprovider tests/ha "$@"
echo "[test-ha] engines started and tests run in $(($(date +%s) - started)) s" >&2
