#!/usr/bin/env bash
# Start or stop the engines of the HA tests (docs/operations.md) on this machine, loopback only:
#   - a 3-node RabbitMQ cluster: ha1@localhost, ha2@localhost, ha3@localhost
#     (AMQP 5701-5703, distribution 25701-25703), beside the machine's own node on 5672;
#   - a standalone node, solo@localhost (AMQP 5704, distribution 25704), that tests may stop
#     and start (the machine's own node serves other tests and is never restarted);
#   - a Redis master (6391), its replica (6392) and three Sentinels (26391-26393)
#     watching it as "ha-master", beside the machine's own Redis on 6379.
# The machine's default RabbitMQ node and Redis are never touched.
#
#   scripts/ha-engines.sh start   # stops leftovers of an earlier run first
#   scripts/ha-engines.sh stop    # idempotent; removes every data folder
#
# Everything lives under $HA_DIR (default /tmp/guillotina-amqp-ha). Run as root:
# rabbitmq-server drops to the `rabbitmq` user (sharing its Erlang cookie with rabbitmqctl),
# so the script makes that user the owner of the nodes' folders.
set -Eeuo pipefail

HA_DIR=${HA_DIR:-/tmp/guillotina-amqp-ha}
case "$HA_DIR" in
    /tmp/?*) ;;  # stop() removes it: never anything outside /tmp
    *)
        echo "HA_DIR must be a folder under /tmp, not $HA_DIR" >&2
        exit 2
        ;;
esac
RABBIT_NODES=(ha1 ha2 ha3 solo)
CLUSTER_NODES=(ha1 ha2 ha3)  # solo stays out of the cluster
AMQP_BASE_PORT=5700
DIST_BASE_PORT=25700
REDIS_MASTER=6391
REDIS_REPLICA=6392
SENTINELS=(26391 26392 26393)
MASTER_NAME=ha-master

log() { echo "[ha-engines] $*" >&2; }

node_env() {  # node index -> the environment of that rabbitmq-server
    local i=$1 node=${RABBIT_NODES[$1]} dir=$HA_DIR/rabbit/${RABBIT_NODES[$1]}
    echo "RABBITMQ_NODENAME=$node@localhost"
    echo "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
    echo "RABBITMQ_NODE_PORT=$((AMQP_BASE_PORT + i + 1))"
    echo "RABBITMQ_DIST_PORT=$((DIST_BASE_PORT + i + 1))"
    echo "RABBITMQ_MNESIA_BASE=$dir/mnesia"
    echo "RABBITMQ_LOG_BASE=$dir/log"
    echo "RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf"
    echo "RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf"
    echo "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins"
    echo "RABBITMQ_PID_FILE=$dir/beam.pid"
}

ctl() {  # node name, rabbitmqctl arguments...
    local node=$1
    shift
    timeout 120 rabbitmqctl -q -n "$node@localhost" "$@"
}

start_rabbit_node() {
    local i=$1 node=${RABBIT_NODES[$1]} dir=$HA_DIR/rabbit/${RABBIT_NODES[$1]}
    mkdir -p "$dir/mnesia" "$dir/log"
    echo "listeners.tcp.local = 127.0.0.1:$((AMQP_BASE_PORT + i + 1))" >"$dir/rabbitmq.conf"
    # the machine's rabbitmq-env.conf names the default node: ours replaces it
    cat >"$dir/rabbitmq-env.conf" <<EOF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    echo "[]." >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
    # its own session: stop() ends the wrappers (su, sh) and the node by that session's id
    # shellcheck disable=SC2046
    env $(node_env "$i") setsid rabbitmq-server >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$HA_DIR/rabbit/$node.session"
    disown
}

start_rabbit() {
    for i in "${!RABBIT_NODES[@]}"; do start_rabbit_node "$i"; done
    for node in "${RABBIT_NODES[@]}"; do
        # `wait` waits for the pid file, then for the node to boot
        ctl "$node" wait "$HA_DIR/rabbit/$node/beam.pid" --timeout 180 >/dev/null ||
            { log "node $node did not start: see $HA_DIR/rabbit/$node/log"; return 1; }
    done
    for node in "${CLUSTER_NODES[@]:1}"; do
        ctl "$node" stop_app
        ctl "$node" join_cluster "${CLUSTER_NODES[0]}@localhost"
        ctl "$node" start_app
    done
    local running
    running=$(ctl ha1 cluster_status --formatter json | python3 -c 'import json, sys; print(*json.load(sys.stdin)["running_nodes"])')
    [ "$(wc -w <<<"$running")" = 3 ] || { log "cluster incomplete: $running"; return 1; }
    log "RabbitMQ cluster running: $running"
}

start_redis() {
    local dir=$HA_DIR/redis
    mkdir -p "$dir"
    local common=(--bind 127.0.0.1 --save "" --appendonly no --daemonize no)
    redis-server --port "$REDIS_MASTER" --dir "$dir" "${common[@]}" >"$dir/master.log" 2>&1 &
    echo $! >"$dir/master.pid"
    disown
    redis-server --port "$REDIS_REPLICA" --dir "$dir" --replicaof 127.0.0.1 "$REDIS_MASTER" \
        "${common[@]}" >"$dir/replica.log" 2>&1 &
    echo $! >"$dir/replica.pid"
    disown
    for port in "${SENTINELS[@]}"; do
        # Sentinel rewrites its file with what it learns: one file each
        cat >"$dir/sentinel-$port.conf" <<EOF
bind 127.0.0.1
port $port
dir $dir
sentinel monitor $MASTER_NAME 127.0.0.1 $REDIS_MASTER 2
sentinel down-after-milliseconds $MASTER_NAME 1000
sentinel failover-timeout $MASTER_NAME 5000
sentinel parallel-syncs $MASTER_NAME 1
EOF
        redis-server "$dir/sentinel-$port.conf" --sentinel >"$dir/sentinel-$port.log" 2>&1 &
        echo $! >"$dir/sentinel-$port.pid"
        disown
    done
    for port in "$REDIS_MASTER" "$REDIS_REPLICA" "${SENTINELS[@]}"; do
        wait_port "$port"
    done
    for _ in $(seq 300); do
        if redis-cli -p "$REDIS_REPLICA" info replication | grep -q "master_link_status:up" &&
            [ "$(redis-cli -p "${SENTINELS[0]}" sentinel replicas "$MASTER_NAME" | grep -c "^127.0.0.1$")" -ge 1 ] &&
            [ "$(redis-cli -p "${SENTINELS[0]}" sentinel sentinels "$MASTER_NAME" | grep -c "^127.0.0.1$")" -ge 2 ]; then
            log "Redis master $REDIS_MASTER, replica $REDIS_REPLICA, Sentinels ${SENTINELS[*]}"
            return 0
        fi
        sleep 0.2
    done
    log "Redis replica or Sentinels did not come up"
    return 1
}

wait_port() {
    for _ in $(seq 300); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing listens on port $1"
    return 1
}

stop_rabbit() {
    for node in "${RABBIT_NODES[@]}"; do
        local pidfile=$HA_DIR/rabbit/$node/beam.pid
        [ -f "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            ctl "$node" stop >/dev/null 2>&1 || true
            kill -9 "$pid" 2>/dev/null || true  # still there after a graceful stop: force it
        fi
    done
    # the wrappers (su, sh), and a node still starting (no pid file yet), by their session
    for session in "$HA_DIR"/rabbit/*.session; do
        [ -f "$session" ] || continue
        kill -9 -- "-$(cat "$session")" 2>/dev/null || true
    done
}

stop_redis() {
    local dir=$HA_DIR/redis
    [ -d "$dir" ] || return 0
    for pidfile in "$dir"/*.pid; do
        [ -f "$pidfile" ] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
}

stop() {
    stop_redis
    stop_rabbit
    rm -rf "$HA_DIR"
    log "stopped"
}

start() {
    stop
    # a failed start leaves nothing running
    trap 'log "start failed: stopping what started"; stop' ERR
    mkdir -p "$HA_DIR"
    chmod 755 "$HA_DIR"
    start_redis
    start_rabbit
    log "started (state in $HA_DIR)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
