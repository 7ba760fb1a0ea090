#!/usr/bin/env bash
# Start or stop the RabbitMQ node of the long-task tests (tests/long, `make test-long`) on this
# machine, loopback only: ct@localhost (AMQP 5760, distribution 25760) with a short
# consumer_timeout, so that a task outlives it in seconds instead of RabbitMQ's 30 minutes.
# The machine's default node (5672) and the HA nodes of scripts/ha-engines.sh are never touched.
#
#   scripts/ct-engine.sh start   # stops leftovers of an earlier run first
#   scripts/ct-engine.sh stop    # idempotent; removes the data folder
#
# Everything lives under $CT_DIR (default /tmp/guillotina-amqp-ct). Run as root, as
# scripts/ha-engines.sh: rabbitmq-server drops to the `rabbitmq` user, who owns the folders.
set -Eeuo pipefail
PATH="$PATH:/usr/sbin:/sbin:/usr/lib/rabbitmq/bin"  # where packages put rabbitmq-server

CT_DIR=${CT_DIR:-/tmp/guillotina-amqp-ct}
case "$CT_DIR" in
    /tmp/?*) ;;  # stop() removes it: never anything outside /tmp
    *)
        echo "CT_DIR must be a folder under /tmp, not $CT_DIR" >&2
        exit 2
        ;;
esac
NODE=ct
AMQP_PORT=5760
DIST_PORT=25760
#: milliseconds a delivery may stay unacknowledged (tests/long reads it from RabbitMQ's own reply)
CONSUMER_TIMEOUT_MS=${CONSUMER_TIMEOUT_MS:-5000}

log() { echo "[ct-engine] $*" >&2; }

ctl() { timeout 120 rabbitmqctl -q -n "$NODE@localhost" "$@"; }

start() {
    stop
    trap 'log "start failed: stopping what started"; stop' ERR
    local dir=$CT_DIR/$NODE
    mkdir -p "$dir/mnesia" "$dir/log"
    chmod 755 "$CT_DIR"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
consumer_timeout = $CONSUMER_TIMEOUT_MS
EOF
    # the machine's rabbitmq-env.conf names the default node: ours replaces it
    cat >"$dir/rabbitmq-env.conf" <<EOF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    echo "[]." >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
    # its own session: stop() ends the wrappers (su, sh) and the node by that session's id
    env RABBITMQ_NODENAME="$NODE@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$AMQP_PORT RABBITMQ_DIST_PORT=$DIST_PORT \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/beam.pid" \
        setsid rabbitmq-server >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$CT_DIR/$NODE.session"
    disown
    # `wait` waits for the pid file, then for the node to boot
    ctl wait "$dir/beam.pid" --timeout 180 >/dev/null || { log "node did not start: see $dir/log"; return 1; }
    log "RabbitMQ $NODE@localhost on 127.0.0.1:$AMQP_PORT, consumer_timeout $CONSUMER_TIMEOUT_MS ms"
}

stop() {
    local pid
    pid=$(cat "$CT_DIR/$NODE/beam.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        ctl stop >/dev/null 2>&1 || true
        kill -9 "$pid" 2>/dev/null || true  # still there after a graceful stop: force it
    fi
    if [ -f "$CT_DIR/$NODE.session" ]; then
        kill -9 -- "-$(cat "$CT_DIR/$NODE.session")" 2>/dev/null || true
    fi
    rm -rf "$CT_DIR"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
