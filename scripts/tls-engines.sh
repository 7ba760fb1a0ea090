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
# Run as root (scripts/lib.sh says why).
set -Eeuo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
engines_dir TLS_DIR /tmp/guillotina-amqp-tls
NODES=(tls mtls)
#: per node: plain AMQP port (none: no plain listener), AMQPS port, distribution port, whether
#: a client certificate is required
declare -A AMQP_PORT=([tls]=5750 [mtls]=none) AMQPS_PORT=([tls]=5751 [mtls]=5753)
declare -A DIST_PORT=([tls]=25750 [mtls]=25753) PEER_CERT=([tls]=false [mtls]=true)
USER=tasks

log() { echo "[tls-engines] $*" >&2; }

config() {  # node: its rabbitmq.conf
    local node=$1 certs=$TLS_DIR/certs
    if [ "${AMQP_PORT[$node]}" = none ]; then
        echo "listeners.tcp = none"
    else
        echo "listeners.tcp.local = 127.0.0.1:${AMQP_PORT[$node]}"
    fi
    cat <<CONF
listeners.ssl.local = 127.0.0.1:${AMQPS_PORT[$node]}
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
# a client certificate is checked when one is shown; required when fail_if_no_peer_cert
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = ${PEER_CERT[$node]}
CONF
}

start() {
    bash "$(dirname "$0")/make-certs.sh" "$TLS_DIR/certs"
    local node port password
    for node in "${NODES[@]}"; do  # both boot at once
        # RABBITMQ_NODE_PORT must be a number, even for a node without a plain listener
        port=${AMQP_PORT[$node]}
        [ "$port" = none ] && port=${AMQPS_PORT[$node]}
        rabbit_start "$node" "$TLS_DIR/$node" "$port" "${DIST_PORT[$node]}" "$(config "$node")"
    done
    password=$(openssl rand -hex 16)
    for node in "${NODES[@]}"; do
        rabbit_wait "$node" "$TLS_DIR/$node"
        rabbit_ctl "$node" add_user "$USER" "$password" >/dev/null
        rabbit_ctl "$node" set_permissions -p / "$USER" ".*" ".*" ".*"
        log "RabbitMQ $node@localhost: amqp ${AMQP_PORT[$node]}, amqps ${AMQPS_PORT[$node]}," \
            "client certificate required: ${PEER_CERT[$node]} (state in $TLS_DIR)"
    done
    echo "$password" >"$TLS_DIR/amqp-password"
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        rabbit_stop "$node" "$TLS_DIR/$node"
    done
    rm -rf "$TLS_DIR"
    log "stopped"
}

engines_main "$TLS_DIR" "$@"
