# shellcheck shell=bash
# Shared settings for the ci/*.sh scripts. Sourced, never executed.
#
# Every path and knob can be overridden from the environment.

# The Debian 20.10 client that comes with the daemon these scripts start: they
# only run, import, tag and push (no builds), so any client would do.
QWEN_FT_DOCKER="${QWEN_FT_DOCKER:-/usr/bin/docker}"

QWEN_FT_CI_STATE="${QWEN_FT_CI_STATE:-/var/lib/qwen-ft-ci}"
QWEN_FT_CI_RUN="${QWEN_FT_CI_RUN:-/run/qwen-ft-ci}"
QWEN_FT_CI_LOG="${QWEN_FT_CI_LOG:-/var/log/qwen-ft-ci}"

DOCKERD_PIDFILE="${DOCKERD_PIDFILE:-/var/run/docker.pid}"
DOCKERD_DATA_ROOT="${DOCKERD_DATA_ROOT:-/var/lib/docker}"
DOCKERD_LOG="${DOCKERD_LOG:-$QWEN_FT_CI_LOG/dockerd.log}"
DOCKERD_WAIT_S="${DOCKERD_WAIT_S:-60}"
# Empty: probe overlay2, then fuse-overlayfs, then vfs (the first that works
# wins and is remembered in $QWEN_FT_CI_STATE/storage-driver). Set: use only it.
QWEN_FT_STORAGE_DRIVER="${QWEN_FT_STORAGE_DRIVER:-}"

REGISTRY_ADDR="${REGISTRY_ADDR:-127.0.0.1:5000}"
REGISTRY_ROOT="${REGISTRY_ROOT:-/var/lib/qwen-ft-registry}"
REGISTRY_CONFIG="${REGISTRY_CONFIG:-$QWEN_FT_CI_STATE/registry.yml}"
REGISTRY_PIDFILE="${REGISTRY_PIDFILE:-$QWEN_FT_CI_RUN/registry.pid}"
REGISTRY_LOG="${REGISTRY_LOG:-$QWEN_FT_CI_LOG/registry.log}"
REGISTRY_WAIT_S="${REGISTRY_WAIT_S:-30}"

QWEN_FT_BASE_IMAGE="${QWEN_FT_BASE_IMAGE:-qwen-ft-local/debian:bookworm}"
# The same Debian for linux/arm64 (debootstrap --arch=arm64, run under qemu-user-static). A
# classic (non-containerd) image store holds one platform per name, hence a name of its own.
QWEN_FT_BASE_IMAGE_ARM64="${QWEN_FT_BASE_IMAGE_ARM64:-qwen-ft-local/debian:bookworm-arm64}"
# No mirror is named here: the base image uses the host's own apt sources (so a mirror
# configured on the host is what the image gets too); DEBIAN_MIRROR overrides them.
DEBIAN_MIRROR="${DEBIAN_MIRROR:-}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_COMPONENTS="${DEBIAN_COMPONENTS:-main}"
# The DeepSpeed builder in CI (ci/make-devel-image.sh): Debian trixie, whose non-free
# nvidia-cuda-toolkit is nvcc 12.4 (sm_50-sm_90, so sm_70 too), and its base image.
QWEN_FT_TRIXIE_IMAGE="${QWEN_FT_TRIXIE_IMAGE:-qwen-ft-local/debian:trixie}"
QWEN_FT_DEVEL_IMAGE="${QWEN_FT_DEVEL_IMAGE:-qwen-ft-local/debian:trixie-devel}"

# host_repos: "URI SUITE" for each repository the host's apt is configured with.
host_repos() {
    # shellcheck disable=SC2016  # apt's own $(...) placeholders
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | sort -u
}

log() { printf '[%s %s] %s\n' "$(date -u +%H:%M:%S)" "${0##*/}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

# binfmt_ready ARCH: the kernel runs ARCH's ELF binaries through qemu with the F flag
# (interpreter opened at registration), so they also run inside containers and BuildKit steps.
binfmt_ready() {
    local qemu
    case $1 in
    arm64 | aarch64) qemu=qemu-aarch64 ;;
    amd64 | x86_64) qemu=qemu-x86_64 ;;
    *) return 1 ;;
    esac
    [[ -f /proc/sys/fs/binfmt_misc/$qemu ]] &&
        grep -qx enabled "/proc/sys/fs/binfmt_misc/$qemu" &&
        grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/$qemu"
}

# docker_cli ARGS...: the Debian client, whatever `docker` is first in PATH.
docker_cli() { "$QWEN_FT_DOCKER" "$@"; }

daemon_answers() { docker_cli version >/dev/null 2>&1; }

registry_answers() { curl -fsS --max-time 2 "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; }

# pid_alive PIDFILE: the pid in PIDFILE names a live process.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s.
wait_for() {
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 2; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    log "timed out after ${limit}s waiting for $what"
    return 1
}
