#!/usr/bin/env bash
# Start or stop the RabbitMQ node of the long-task tests (tests/long, `make test-long`) on this
# machine, loopback only: ct@localhost (AMQP 5760, distribution 25760) with a short
# consumer_timeout, so that a task outlives it in seconds instead of RabbitMQ's 30 minutes.
# The machine's default node (5672) and the HA nodes of scripts/ha-engines.sh are never touched.
#
#   scripts/ct-engine.sh start   # stops leftovers of an earlier run first
#   scripts/ct-engine.sh stop    # idempotent; removes the data folder
#
# Everything lives under $CT_DIR (default /tmp/guillotina-amqp-ct). Run as root (scripts/lib.sh
# says why).
set -Eeuo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
engines_dir CT_DIR /tmp/guillotina-amqp-ct
NODE=ct
AMQP_PORT=5760
DIST_PORT=25760
#: milliseconds a delivery may stay unacknowledged (tests/long reads it from RabbitMQ's own reply)
CONSUMER_TIMEOUT_MS=${CONSUMER_TIMEOUT_MS:-5000}

log() { echo "[ct-engine] $*" >&2; }

start() {
    rabbit_start "$NODE" "$CT_DIR/$NODE" "$AMQP_PORT" "$DIST_PORT" \
        "listeners.tcp.local = 127.0.0.1:$AMQP_PORT
consumer_timeout = $CONSUMER_TIMEOUT_MS"
    rabbit_wait "$NODE" "$CT_DIR/$NODE"
    log "RabbitMQ $NODE@localhost on 127.0.0.1:$AMQP_PORT, consumer_timeout $CONSUMER_TIMEOUT_MS ms"
}

stop() {
    rabbit_stop "$NODE" "$CT_DIR/$NODE"
    rm -rf "$CT_DIR"
    log "stopped"
}

engines_main "$CT_DIR" "$@"
