#!/usr/bin/env bash
# Make sure the services the tests, the demo and the benchmarks talk to answer:
#   RabbitMQ   (default 127.0.0.1:5672, override with RABBITMQ=host:port)
#   Redis      (default 127.0.0.1:6379, override with REDIS=host:port)
#   PostgreSQL (default 127.0.0.1:5432, override with POSTGRESQL=host:port)
# These are the same variables pytest-docker-fixtures reads.
#
# A local service that does not answer is started if its server is installed, or
# installed with apt-get first (only when running as root). A service pointed at a
# non-local host is only checked, never started.
#
# Chromium (the dashboard's browser tests drive the OS build, Playwright downloads none) is
# installed with apt-get when missing, like a server.
#
# Usage: scripts/ensure-services.sh [rabbitmq] [redis] [postgresql] [chromium]   (default: all four)
# Env:   ENSURE_SERVICES_TIMEOUT  seconds to wait for the ports (default 90)
set -uo pipefail

TIMEOUT="${ENSURE_SERVICES_TIMEOUT:-90}"
PATH="$PATH:/usr/sbin:/sbin:/usr/lib/rabbitmq/bin"

log() { echo "ensure-services: $*" >&2; }

# ---------------------------------------------------------------- helpers
addr_of() { # service -> host:port
    case "$1" in
        rabbitmq) echo "${RABBITMQ:-127.0.0.1:5672}" ;;
        redis) echo "${REDIS:-127.0.0.1:6379}" ;;
        postgresql) echo "${POSTGRESQL:-127.0.0.1:5432}" ;;
    esac
}
env_of() {
    case "$1" in
        rabbitmq) echo RABBITMQ ;;
        redis) echo REDIS ;;
        postgresql) echo POSTGRESQL ;;
    esac
}
host_of() { echo "${1%:*}"; }
port_of() { echo "${1##*:}"; }

is_local() {
    case "$1" in
        127.* | localhost | ::1 | "[::1]" | 0.0.0.0 | "") return 0 ;;
        *) return 1 ;;
    esac
}

port_open() { # host port
    local host="$1" port="$2"
    host="${host#[}"
    host="${host%]}"
    timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

have_server() {
    case "$1" in
        rabbitmq) command -v rabbitmq-server >/dev/null 2>&1 ;;
        redis) command -v redis-server >/dev/null 2>&1 ;;
        postgresql)
            command -v pg_ctlcluster >/dev/null 2>&1 &&
                [ -d /etc/postgresql ] && [ -n "$(ls -A /etc/postgresql 2>/dev/null)" ]
            ;;
    esac
}

apt_package_of() {
    case "$1" in
        rabbitmq) echo rabbitmq-server ;;
        redis) echo redis-server ;;
        postgresql) echo postgresql ;;
    esac
}

APT_UPDATED=0
apt_install() { # package
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
        APT_UPDATED=1
    fi
    log "apt-get install $1"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1" >&2
}

start_server() { # service port
    local svc="$1" port="$2"
    case "$svc" in
        postgresql)
            local ver
            ver="$(ls /etc/postgresql | sort -V | tail -n 1)"
            log "starting PostgreSQL $ver/main"
            # exits 2 when the cluster is already running (e.g. still starting up)
            pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 || [ $? = 2 ]
            ;;
        redis)
            local dir=/var/lib/redis logdir=/var/log/redis
            if ! mkdir -p "$dir" "$logdir" 2>/dev/null || [ ! -w "$dir" ] || [ ! -w "$logdir" ]; then
                dir="${TMPDIR:-/tmp}/redis-ci"
                logdir="$dir"
                mkdir -p "$dir"
            fi
            log "starting redis-server on port $port (log: $logdir/ci.log)"
            redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" \
                --appendonly no --dir "$dir" --logfile "$logdir/ci.log" >&2
            ;;
        rabbitmq)
            if pgrep -f 'beam.*rabbit' >/dev/null 2>&1; then
                log "RabbitMQ is already booting; waiting for it"
                return 0
            fi
            log "starting rabbitmq-server (log: /var/log/rabbitmq/)"
            rabbitmq-server -detached >&2
            ;;
    esac
}

missing_hint() { # service addr
    local svc="$1" addr="$2" var
    var="$(env_of "$svc")"
    cat >&2 <<EOF
ensure-services: $svc is not answering on $addr and its server is not installed.
  Either install it (as root: apt-get install $(apt_package_of "$svc")) and re-run this script,
  or point $var=host:port at a running $svc server.
EOF
}

ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        echo "chromium ok"
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt_install chromium; then
        echo "chromium ok"
        return 0
    fi
    log "chromium is missing and could not be installed (as root: apt-get install chromium)"
    return 1
}

# ---------------------------------------------------------------- main
if [ "$#" -gt 0 ]; then
    REQUESTED=("$@")
else
    REQUESTED=(rabbitmq redis postgresql chromium)
fi

failed=0
declare -a SERVICES=()
for item in "${REQUESTED[@]}"; do
    if [ "$item" = chromium ]; then
        ensure_chromium || failed=1
    else
        SERVICES+=("$item")
    fi
done
declare -a WAIT=()
declare -A FRESH_INSTALL=()

for svc in "${SERVICES[@]}"; do
    case "$svc" in
        rabbitmq | redis | postgresql) ;;
        *)
            log "unknown service '$svc' (known: rabbitmq redis postgresql chromium)"
            exit 2
            ;;
    esac
    addr="$(addr_of "$svc")"
    host="$(host_of "$addr")"
    port="$(port_of "$addr")"

    if port_open "$host" "$port"; then
        echo "$svc $addr ok"
        continue
    fi
    if ! is_local "$host"; then
        echo "$svc $addr not answering (remote host: not starting anything)" >&2
        failed=1
        continue
    fi

    if ! have_server "$svc"; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            if apt_install "$(apt_package_of "$svc")" && have_server "$svc"; then
                FRESH_INSTALL[$svc]=1
            else
                log "installing $(apt_package_of "$svc") failed"
                missing_hint "$svc" "$addr"
                failed=1
                continue
            fi
        else
            missing_hint "$svc" "$addr"
            failed=1
            continue
        fi
    fi

    # the package's own post-install may already have started it
    if ! port_open "$host" "$port"; then
        if ! start_server "$svc" "$port"; then
            log "could not start $svc"
            failed=1
            continue
        fi
    fi
    WAIT+=("$svc")
done

# Wait for everything we started (in parallel; RabbitMQ is the slow one).
deadline=$((SECONDS + TIMEOUT))
while [ "${#WAIT[@]}" -gt 0 ]; do
    declare -a still=()
    for svc in "${WAIT[@]}"; do
        addr="$(addr_of "$svc")"
        if port_open "$(host_of "$addr")" "$(port_of "$addr")"; then
            if [ "$svc" = postgresql ] && [ -n "${FRESH_INSTALL[postgresql]:-}" ]; then
                # A fresh Debian cluster wants a password over TCP; give the postgres
                # role the one guillotina's test fixtures use.
                runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >&2 ||
                    log "could not set the postgres password"
            fi
            echo "$svc $addr ok"
        else
            still+=("$svc")
        fi
    done
    WAIT=("${still[@]+"${still[@]}"}")
    unset still
    [ "${#WAIT[@]}" -eq 0 ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
        for svc in "${WAIT[@]}"; do
            echo "$svc $(addr_of "$svc") FAILED: not answering after ${TIMEOUT}s" >&2
            case "$svc" in
                rabbitmq) log "  see /var/log/rabbitmq/ for the broker's logs" ;;
                redis) log "  see /var/log/redis/ci.log" ;;
                postgresql) log "  see /var/log/postgresql/" ;;
            esac
        done
        failed=1
        break
    fi
    sleep 1
done

exit "$failed"
