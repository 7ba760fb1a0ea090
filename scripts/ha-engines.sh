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
# Everything lives under $HA_DIR (default /tmp/guillotina-amqp-ha). Run as root (scripts/lib.sh
# says why).
set -Eeuo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
engines_dir HA_DIR /tmp/guillotina-amqp-ha
RABBIT_NODES=(ha1 ha2 ha3 solo)
CLUSTER_NODES=(ha1 ha2 ha3)  # solo stays out of the cluster
AMQP_BASE_PORT=5700
DIST_BASE_PORT=25700
REDIS_MASTER=6391
REDIS_REPLICA=6392
SENTINELS=(26391 26392 26393)
MASTER_NAME=ha-master

log() { echo "[ha-engines] $*" >&2; }

start_rabbit() {
    for i in "${!RABBIT_NODES[@]}"; do
        local node=${RABBIT_NODES[$i]} port=$((AMQP_BASE_PORT + i + 1))
        rabbit_start "$node" "$HA_DIR/rabbit/$node" "$port" "$((DIST_BASE_PORT + i + 1))" \
            "listeners.tcp.local = 127.0.0.1:$port"
    done
    for node in "${RABBIT_NODES[@]}"; do rabbit_wait "$node" "$HA_DIR/rabbit/$node"; done
    for node in "${CLUSTER_NODES[@]:1}"; do
        rabbit_ctl "$node" stop_app
        rabbit_ctl "$node" join_cluster "${CLUSTER_NODES[0]}@localhost"
        rabbit_ctl "$node" start_app
    done
    local running
    running=$(rabbit_ctl ha1 cluster_status --formatter json | python3 -c 'import json, sys; print(*json.load(sys.stdin)["running_nodes"])')
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
    for node in "${RABBIT_NODES[@]}"; do rabbit_stop "$node" "$HA_DIR/rabbit/$node"; done
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
    start_redis
    start_rabbit
    log "started (state in $HA_DIR)"
}

engines_main "$HA_DIR" "$@"
