#!/usr/bin/env bash
# Stop the registry and dockerd started by ci/start-services.sh (SIGTERM, then
# SIGKILL after a bounded wait). Images, build cache and registry data stay on
# disk. Safe to run when nothing is running.
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

# stop NAME PIDFILE TIMEOUT_S
stop() {
    local name=$1 pidfile=$2 timeout=$3 pid
    if ! pid_alive "$pidfile"; then
        log "$name is not running"
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # shellcheck disable=SC2016
    if ! wait_for "$timeout" "$name to exit" bash -c '! kill -0 "$1" 2>/dev/null' _ "$pid"; then
        log "$name did not exit; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$pidfile"
}

stop registry "$REGISTRY_PIDFILE" 10
# dockerd stops its containers (10 s grace each) and its containerd itself.
stop dockerd "$DOCKERD_PIDFILE" 60

if daemon_answers; then
    log "warning: a Docker daemon still answers (not one started by ci/start-services.sh?)"
fi
if registry_answers; then
    log "warning: something still answers on http://$REGISTRY_ADDR/v2/"
fi
