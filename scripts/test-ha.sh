#!/usr/bin/env bash
# `make test-ha`: start the HA engines (scripts/ha-engines.sh), run tests/ha, stop them
# again whatever happens (a failing test, Ctrl-C, a failed start).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
with_engines ha-engines.sh test-ha env GUILLOTINA_AMQP_HA=1 .venv/bin/pytest -p no:cacheprovider tests/ha "$@"
