#!/usr/bin/env bash
# Start or stop the RabbitMQ nodes of the TLS tests on this machine, loopback only, both with the
# certificates of scripts/make-certs.sh and a user `tasks` whose password is made at random:
#   tls@localhost:  AMQP 5750 (plain), AMQPS 5751, distribution 25750; a client certificate is
#                   checked when one is shown, not required (what managed brokers do)
#   mtls@localhost: AMQPS 5753, distribution 25753; a client certificate signed by the test CA
#                   is required (mutual TLS: ssl_options.fail_if_no_peer_cert)
# RabbitMQ's TLS options hold for all of a node's listeners: two ways of checking clients take
# two nodes. The machine's default RabbitMQ node, and the HA tests' nodes, are never touched.
#
#   scripts/tls-engines.sh start   # stops leftovers of an earlier run first
#   scripts/tls-engines.sh stop    # idempotent; removes its folder
#
# Everything lives under $TLS_DIR (default /tmp/guillotina-amqp-tls): certs/ (the test CA, the
# server's and a client's certificates, an untrusted CA), amqp-password, each node's data.
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
NODES=(tls mtls)
#: per node: plain AMQP port (none: no plain listener), AMQPS port, distribution port, whether
#: a client certificate is required
declare -A AMQP_PORT=([tls]=5750 [mtls]=none) AMQPS_PORT=([tls]=5751 [mtls]=5753)
declare -A DIST_PORT=([tls]=25750 [mtls]=25753) PEER_CERT=([tls]=false [mtls]=true)
USER=tasks

log() { echo "[tls-engines] $*" >&2; }

ctl() { timeout 120 rabbitmqctl -q -n "$1@localhost" "${@:2}"; }

node_dir() { echo "$TLS_DIR/$1"; }

write_config() {
    local node=$1 dir certs=$TLS_DIR/certs tcp
    dir=$(node_dir "$node")
    tcp=${AMQP_PORT[$node]}
    [ "$tcp" = none ] && tcp="listeners.tcp = none" || tcp="listeners.tcp.local = 127.0.0.1:$tcp"
    cat >"$dir/rabbitmq.conf" <<CONF
$tcp
listeners.ssl.local = 127.0.0.1:${AMQPS_PORT[$node]}
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
# a client certificate is checked when one is shown; required when fail_if_no_peer_cert
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = ${PEER_CERT[$node]}
CONF
    # the machine's rabbitmq-env.conf names the default node: ours replaces it
    cat >"$dir/rabbitmq-env.conf" <<CONF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
    echo "[]." >"$dir/enabled_plugins"
}

launch() {
    local node=$1 dir node_port
    dir=$(node_dir "$node")
    mkdir -p "$dir/mnesia" "$dir/log"
    write_config "$node"
    chown -R rabbitmq:rabbitmq "$dir"
    # RABBITMQ_NODE_PORT must be a number, even for a node without a plain listener
    node_port=${AMQP_PORT[$node]}
    [ "$node_port" = none ] && node_port=${AMQPS_PORT[$node]}
    # its own session: stop() ends the wrappers (su, sh) and the node by that session's id
    env RABBITMQ_NODENAME="$node@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$node_port" RABBITMQ_DIST_PORT="${DIST_PORT[$node]}" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/beam.pid" \
        setsid rabbitmq-server >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$TLS_DIR/$node.session"
    disown
}

add_user() {  # node, password
    local dir
    dir=$(node_dir "$1")
    ctl "$1" wait "$dir/beam.pid" --timeout 180 >/dev/null ||
        { log "node $1 did not start: see $dir/log"; return 1; }
    ctl "$1" add_user "$USER" "$2" >/dev/null
    ctl "$1" set_permissions -p / "$USER" ".*" ".*" ".*"
}

start() {
    stop
    trap 'log "start failed: stopping what started"; stop' ERR
    mkdir -p "$TLS_DIR"
    chmod 755 "$TLS_DIR"
    bash "$(dirname "$0")/make-certs.sh" "$TLS_DIR/certs"
    local node password
    for node in "${NODES[@]}"; do
        launch "$node"  # both boot at once
    done
    password=$(openssl rand -hex 16)
    for node in "${NODES[@]}"; do
        add_user "$node" "$password"
    done
    echo "$password" >"$TLS_DIR/amqp-password"
    for node in "${NODES[@]}"; do
        log "RabbitMQ $node@localhost: amqp ${AMQP_PORT[$node]}, amqps ${AMQPS_PORT[$node]}," \
            "client certificate required: ${PEER_CERT[$node]} (state in $TLS_DIR)"
    done
}

stop_node() {
    local node=$1 pid dir
    dir=$(node_dir "$node")
    pid=$(cat "$dir/beam.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        ctl "$node" stop >/dev/null 2>&1 || true
        kill -9 "$pid" 2>/dev/null || true  # still there after a graceful stop
    fi
    # the wrappers (su, sh), and a node still starting (no pid file yet), by their session
    if [ -f "$TLS_DIR/$node.session" ]; then
        kill -9 -- "-$(cat "$TLS_DIR/$node.session")" 2>/dev/null || true
    fi
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_node "$node"
    done
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
