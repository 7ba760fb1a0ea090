#!/usr/bin/env bash
# Start or stop the RabbitMQ node of the TLS tests on this machine, loopback only:
#   tls@localhost: AMQP 5750 (plain), AMQPS 5751 (TLS, certificates of scripts/make-certs.sh),
#   distribution 25750; a user `tasks` whose password is made at random for the run.
# The machine's default RabbitMQ node, and the HA tests' nodes, are never touched.
#
#   scripts/tls-engines.sh start   # stops leftovers of an earlier run first
#   scripts/tls-engines.sh stop    # idempotent; removes its folder
#
# Everything lives under $TLS_DIR (default /tmp/guillotina-amqp-tls): certs/ (the test CA, the
# server's and a client's certificates, an untrusted CA), amqp-password, the node's data.
# Run as root: rabbitmq-server drops to the `rabbitmq` user, which must own the node's folders.
set -Eeuo pipefail

TLS_DIR=${TLS_DIR:-/tmp/guillotina-amqp-tls}
case "$TLS_DIR" in
    /tmp/?*) ;;  # stop() removes it: never anything outside /tmp
    *)
        echo "TLS_DIR must be a folder under /tmp, not $TLS_DIR" >&2
        exit 2
        ;;
esac
NODE=tls
AMQP_PORT=5750
AMQPS_PORT=5751
DIST_PORT=25750
USER=tasks
NODE_DIR=$TLS_DIR/rabbit

log() { echo "[tls-engines] $*" >&2; }

ctl() { timeout 120 rabbitmqctl -q -n "$NODE@localhost" "$@"; }

write_config() {
    local certs=$TLS_DIR/certs
    cat >"$NODE_DIR/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
listeners.ssl.local = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
# a client certificate is checked when one is shown, not required
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
CONF
    # the machine's rabbitmq-env.conf names the default node: ours replaces it
    cat >"$NODE_DIR/rabbitmq-env.conf" <<CONF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
    echo "[]." >"$NODE_DIR/enabled_plugins"
}

start() {
    stop
    trap 'log "start failed: stopping what started"; stop' ERR
    mkdir -p "$NODE_DIR/mnesia" "$NODE_DIR/log"
    chmod 755 "$TLS_DIR"
    bash "$(dirname "$0")/make-certs.sh" "$TLS_DIR/certs"
    write_config
    chown -R rabbitmq:rabbitmq "$NODE_DIR"
    # its own session: stop() ends the wrappers (su, sh) and the node by that session's id
    env RABBITMQ_NODENAME="$NODE@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_MNESIA_BASE="$NODE_DIR/mnesia" RABBITMQ_LOG_BASE="$NODE_DIR/log" \
        RABBITMQ_CONFIG_FILE="$NODE_DIR/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$NODE_DIR/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$NODE_DIR/enabled_plugins" RABBITMQ_PID_FILE="$NODE_DIR/beam.pid" \
        setsid rabbitmq-server >"$NODE_DIR/server.out" 2>&1 </dev/null &
    echo $! >"$TLS_DIR/node.session"
    disown
    ctl wait "$NODE_DIR/beam.pid" --timeout 180 >/dev/null ||
        { log "node $NODE did not start: see $NODE_DIR/log"; return 1; }
    local password
    password=$(openssl rand -hex 16)
    ctl add_user "$USER" "$password" >/dev/null
    ctl set_permissions -p / "$USER" ".*" ".*" ".*"
    echo "$password" >"$TLS_DIR/amqp-password"
    log "RabbitMQ $NODE@localhost: amqp $AMQP_PORT, amqps $AMQPS_PORT (state in $TLS_DIR)"
}

stop() {
    local pid
    pid=$(cat "$NODE_DIR/beam.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        ctl stop >/dev/null 2>&1 || true
        kill -9 "$pid" 2>/dev/null || true  # still there after a graceful stop
    fi
    # the wrappers (su, sh), and a node still starting (no pid file yet), by their session
    if [ -f "$TLS_DIR/node.session" ]; then
        kill -9 -- "-$(cat "$TLS_DIR/node.session")" 2>/dev/null || true
    fi
    rm -rf "$TLS_DIR"
}

case "${1:-}" in
    start) start ;;
    stop)
        stop
        log "stopped"
        ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
