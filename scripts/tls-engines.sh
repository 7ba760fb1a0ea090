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
# Run as root (scripts/lib.sh says why).
set -Eeuo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
engines_dir TLS_DIR /tmp/guillotina-amqp-tls
NODE=tls
AMQP_PORT=5750
AMQPS_PORT=5751
DIST_PORT=25750
USER=tasks
NODE_DIR=$TLS_DIR/rabbit

log() { echo "[tls-engines] $*" >&2; }

ctl() { rabbit_ctl "$NODE" "$@"; }

config() {  # the node's rabbitmq.conf
    local certs=$TLS_DIR/certs
    cat <<CONF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
listeners.ssl.local = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
# a client certificate is checked when one is shown, not required
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
CONF
}

start() {
    bash "$(dirname "$0")/make-certs.sh" "$TLS_DIR/certs"
    rabbit_start "$NODE" "$NODE_DIR" "$AMQP_PORT" "$DIST_PORT" "$(config)"
    rabbit_wait "$NODE" "$NODE_DIR"
    local password
    password=$(openssl rand -hex 16)
    ctl add_user "$USER" "$password" >/dev/null
    ctl set_permissions -p / "$USER" ".*" ".*" ".*"
    echo "$password" >"$TLS_DIR/amqp-password"
    log "RabbitMQ $NODE@localhost: amqp $AMQP_PORT, amqps $AMQPS_PORT (state in $TLS_DIR)"
}

stop() {
    rabbit_stop "$NODE" "$NODE_DIR"
    rm -rf "$TLS_DIR"
    log "stopped"
}

engines_main "$TLS_DIR" "$@"
