# Sourced (never run) by the scripts that start RabbitMQ nodes of their own for a test run
# (ha-engines.sh, tls-engines.sh, ct-engine.sh) and by the make targets that run tests against
# them (test-ha.sh, test-long.sh, test-tls.sh). The machine's own node is never touched.
PATH="$PATH:/usr/sbin:/sbin:/usr/lib/rabbitmq/bin"  # where packages put rabbitmq-server

# engines_dir VAR DEFAULT: set VAR (default DEFAULT) to the folder the engines live in, and exit
# unless it lies under /tmp: their stop removes it, never anything outside /tmp.
engines_dir() {
    local value=${!1:-$2}
    case "$value" in
        /tmp/?*) ;;
        *)
            echo "$1 must be a folder under /tmp, not $value" >&2
            exit 2
            ;;
    esac
    printf -v "$1" '%s' "$value"
}

# engines_main DIR ARG: an engines script's command line, calling the script's own start, stop
# and log. `start` first stops what an earlier run left, makes DIR, and stops what started if it
# fails; `stop` is idempotent and removes DIR.
engines_main() {
    local dir=$1
    case "${2:-}" in
        start)
            stop
            trap 'log "start failed: stopping what started"; stop' ERR
            mkdir -p "$dir"
            chmod 755 "$dir"
            start
            ;;
        stop) stop ;;
        *)
            echo "usage: $0 start|stop" >&2
            exit 2
            ;;
    esac
}

# rabbit_ctl NODE ARGS...: rabbitmqctl on NODE@localhost, never waiting for ever
rabbit_ctl() {
    local node=$1
    shift
    timeout 120 rabbitmqctl -q -n "$node@localhost" "$@"
}

# rabbit_start NODE DIR AMQP_PORT DIST_PORT CONFIG: rabbitmq-server as NODE@localhost on loopback,
# CONFIG its rabbitmq.conf, its data, logs and pid file (beam.pid) in DIR, and wait until it runs.
# Run as root: rabbitmq-server drops to the `rabbitmq` user (sharing its Erlang cookie with
# rabbitmqctl), so that user owns DIR.
rabbit_start() {
    local node=$1 dir=$2 amqp_port=$3 dist_port=$4 config=$5
    mkdir -p "$dir/mnesia" "$dir/log"
    echo "$config" >"$dir/rabbitmq.conf"
    # the machine's rabbitmq-env.conf names the default node: ours replaces it
    cat >"$dir/rabbitmq-env.conf" <<EOF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    echo "[]." >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
    # its own session: rabbit_stop ends the wrappers (su, sh) and the node by that session's id
    env RABBITMQ_NODENAME="$node@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp_port" RABBITMQ_DIST_PORT="$dist_port" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/beam.pid" \
        setsid rabbitmq-server >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$dir.session"
    disown
}

# rabbit_wait NODE DIR: until the node rabbit_start started boots (its pid file, then the node)
rabbit_wait() {
    rabbit_ctl "$1" wait "$2/beam.pid" --timeout 180 >/dev/null ||
        { echo "node $1 did not start: see $2/log" >&2; return 1; }
}

# rabbit_stop NODE DIR: stop the node rabbit_start started, if it runs (idempotent)
rabbit_stop() {
    local node=$1 dir=$2 pid
    pid=$(cat "$dir/beam.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        rabbit_ctl "$node" stop >/dev/null 2>&1 || true
        kill -9 "$pid" 2>/dev/null || true  # still there after a graceful stop: force it
    fi
    # the wrappers (su, sh), and a node still starting (no pid file yet), by their session
    if [ -f "$dir.session" ]; then
        kill -9 -- "-$(cat "$dir.session")" 2>/dev/null || true
    fi
}

# with_engines SCRIPT LABEL COMMAND...: start the engines of scripts/SCRIPT, run COMMAND (the
# tests), and stop them again whatever happens (a failing test, Ctrl-C, a failed start).
with_engines() {
    local script=scripts/$1 label=$2 started
    shift 2
    # shellcheck disable=SC2064  # the script's name, now
    trap "bash $script stop" EXIT
    trap 'exit 130' INT TERM
    started=$(date +%s)
    bash "$script" start
    "$@"
    echo "[$label] engines started and tests run in $(($(date +%s) - started)) s" >&2
}
