#!/usr/bin/env bash
# Start dockerd and a local registry on 127.0.0.1:5000, in the background,
# without systemd. Safe to run any number of times: what already answers is
# left alone.
#
#   dockerd   log $DOCKERD_LOG, pidfile $DOCKERD_PIDFILE (/var/run/docker.pid)
#   registry  log $REGISTRY_LOG, pidfile $REGISTRY_PIDFILE, data $REGISTRY_ROOT
#
# Storage driver: $QWEN_FT_STORAGE_DRIVER if set (only that one); else the one remembered in
# $QWEN_FT_CI_STATE/storage-driver; else the first of overlay2,
# fuse-overlayfs, vfs that passes a probe (start, import an image, run a
# container that writes to its rootfs, on the default bridge network).
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

PROBE_IMAGE=qwen-ft-ci/probe:latest
DRIVER_STATE="$QWEN_FT_CI_STATE/storage-driver"

mkdir -p "$QWEN_FT_CI_STATE" "$QWEN_FT_CI_RUN" "$QWEN_FT_CI_LOG" "$REGISTRY_ROOT"

tail_log() {
    log "last lines of $1:"
    tail -n 25 "$1" >&2 || true
}

start_dockerd() {
    local driver=$1
    log "starting dockerd --storage-driver $driver (log $DOCKERD_LOG)"
    printf '\n===== %s start --storage-driver %s\n' "$(date -u +%FT%TZ)" "$driver" >>"$DOCKERD_LOG"
    setsid dockerd --storage-driver "$driver" --pidfile "$DOCKERD_PIDFILE" \
        --data-root "$DOCKERD_DATA_ROOT" </dev/null >>"$DOCKERD_LOG" 2>&1 &
    local pid=$! i
    for ((i = 0; ; i++)); do
        daemon_answers && break
        if ! kill -0 "$pid" 2>/dev/null; then
            log "dockerd exited during startup:"
            grep -E 'level=(error|fatal)|failed to start' "$DOCKERD_LOG" | tail -n 3 >&2 || true
            return 1
        fi
        if ((i >= DOCKERD_WAIT_S * 2)); then
            log "dockerd did not answer within ${DOCKERD_WAIT_S}s"
            tail_log "$DOCKERD_LOG"
            return 1
        fi
        sleep 0.5
    done
    local actual
    actual=$(docker_cli info --format '{{.Driver}}')
    if [[ $actual != "$driver" ]]; then
        log "dockerd came up with storage driver '$actual', not '$driver'"
        return 1
    fi
}

stop_dockerd() {
    pid_alive "$DOCKERD_PIDFILE" || return 0
    local pid
    pid=$(<"$DOCKERD_PIDFILE")
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # shellcheck disable=SC2016
    wait_for 30 "dockerd to exit" bash -c '! kill -0 "$1" 2>/dev/null' _ "$pid" || kill -KILL "$pid" 2>/dev/null || true
}

# A tiny image made of the host's dash and its shared libraries: no registry
# and no debootstrap needed, so every candidate driver can be tried quickly.
ensure_probe_image() {
    docker_cli image inspect "$PROBE_IMAGE" >/dev/null 2>&1 && return 0
    local dir lib
    dir=$(mktemp -d)
    mkdir -p "$dir/bin" "$dir/tmp"
    cp -L /bin/dash "$dir/bin/sh"
    while read -r lib; do
        cp -L --parents "$lib" "$dir/"
    done < <(ldd /bin/dash | grep -o '/[^ ]*')
    tar -C "$dir" -c . | docker_cli import - "$PROBE_IMAGE" >/dev/null
    rm -rf "$dir"
}

# shellcheck disable=SC2016  # $x is for the container's shell
probe_driver() {
    ensure_probe_image &&
        docker_cli run --rm --pull never "$PROBE_IMAGE" /bin/sh -c \
            'echo ok >/tmp/probe && read -r x </tmp/probe && [ "$x" = ok ]'
}

ensure_driver_available() {
    case $1 in
    fuse-overlayfs)
        [[ -c /dev/fuse ]] || { log "no /dev/fuse"; return 1; }
        command -v fuse-overlayfs >/dev/null && return 0
        log "installing fuse-overlayfs"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            fuse-overlayfs >/dev/null 2>&1 ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends fuse-overlayfs >/dev/null; }
        ;;
    esac
}

start_docker() {
    if daemon_answers; then
        log "dockerd already answers (storage driver $(docker_cli info --format '{{.Driver}}'))"
        return 0
    fi
    if pid_alive "$DOCKERD_PIDFILE"; then
        log "dockerd pid $(<"$DOCKERD_PIDFILE") exists but does not answer yet; waiting"
        wait_for "$DOCKERD_WAIT_S" "dockerd to answer" daemon_answers && return 0
        tail_log "$DOCKERD_LOG"
        die "dockerd (pid $(<"$DOCKERD_PIDFILE")) is not answering; stop it with ci/stop-services.sh"
    fi

    local candidates driver
    if [[ -n $QWEN_FT_STORAGE_DRIVER ]]; then
        candidates=("$QWEN_FT_STORAGE_DRIVER")
    else
        candidates=(overlay2 fuse-overlayfs vfs)
        if [[ -s $DRIVER_STATE ]]; then
            local remembered d
            remembered=$(<"$DRIVER_STATE")
            candidates=("$remembered")
            for d in overlay2 fuse-overlayfs vfs; do
                [[ $d == "$remembered" ]] || candidates+=("$d")
            done
        fi
    fi
    for driver in "${candidates[@]}"; do
        ensure_driver_available "$driver" || { log "skipping $driver"; continue; }
        if start_dockerd "$driver" && probe_driver; then
            [[ -n $QWEN_FT_STORAGE_DRIVER ]] || echo "$driver" >"$DRIVER_STATE"
            log "storage driver $driver works"
            return 0
        fi
        log "storage driver $driver failed; trying the next one"
        stop_dockerd
    done
    die "no storage driver worked (tried: ${candidates[*]}); see $DOCKERD_LOG"
}

write_registry_config() {
    cat >"$REGISTRY_CONFIG.tmp" <<EOF
# Written by ci/start-services.sh
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_ROOT
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY_ADDR
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
EOF
    mv "$REGISTRY_CONFIG.tmp" "$REGISTRY_CONFIG"
}

start_registry() {
    if registry_answers; then
        log "registry already answers on http://$REGISTRY_ADDR/v2/"
        return 0
    fi
    if pid_alive "$REGISTRY_PIDFILE"; then
        log "registry pid $(<"$REGISTRY_PIDFILE") exists but does not answer yet; waiting"
        wait_for "$REGISTRY_WAIT_S" "registry to answer" registry_answers && return 0
        tail_log "$REGISTRY_LOG"
        die "registry (pid $(<"$REGISTRY_PIDFILE")) is not answering; stop it with ci/stop-services.sh"
    fi
    write_registry_config
    log "starting registry on $REGISTRY_ADDR (data $REGISTRY_ROOT, log $REGISTRY_LOG)"
    setsid /usr/bin/docker-registry serve "$REGISTRY_CONFIG" \
        </dev/null >>"$REGISTRY_LOG" 2>&1 &
    echo $! >"$REGISTRY_PIDFILE"
    if ! wait_for "$REGISTRY_WAIT_S" "registry to answer" registry_answers; then
        tail_log "$REGISTRY_LOG"
        die "registry did not come up"
    fi
}

# dockerd treats 127.0.0.0/8 as insecure (plain HTTP) by default; check it,
# then push the probe image for real.
check_push() {
    local cidrs ref="$REGISTRY_ADDR/qwen-ft-ci/probe:latest"
    cidrs=$(docker_cli info --format '{{json .RegistryConfig.InsecureRegistryCIDRs}}')
    [[ $cidrs == *'"127.0.0.0/8"'* ]] ||
        die "dockerd does not treat 127.0.0.0/8 as insecure (InsecureRegistryCIDRs=$cidrs)"
    ensure_probe_image
    docker_cli tag "$PROBE_IMAGE" "$ref"
    docker_cli push -q "$ref" >/dev/null || die "docker push $ref failed"
    docker_cli rmi "$ref" >/dev/null
    curl -fsS "http://$REGISTRY_ADDR/v2/qwen-ft-ci/probe/tags/list" | grep -q '"latest"' ||
        die "pushed $ref but the registry does not list it"
    log "push to $REGISTRY_ADDR works (insecure CIDRs $cidrs)"
}

start_docker
start_registry
check_push

docker_cli version --format '  server {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}'
docker_cli info --format '  storage driver {{.Driver}}, data root {{.DockerRootDir}}, cgroup {{.CgroupDriver}} v{{.CgroupVersion}}'
echo "  registry http://$REGISTRY_ADDR/v2/ (data $REGISTRY_ROOT)"
