#!/usr/bin/env bash
# Build a local Debian base image (bookworm unless DEBIAN_SUITE says otherwise) without
# pulling from any registry:
#   debootstrap --variant=minbase $DEBIAN_SUITE ROOT $DEBIAN_MIRROR
#   tar -C ROOT -c . | docker import - NAME
# then tidy it up like the official debian:bookworm image (deb822 sources for
# the suite, its -updates and -security; the docker-* apt.conf.d snippets; a
# policy-rc.d; no apt lists, no resolv.conf).
#
# Another suite than the host's (DEBIAN_SUITE=trixie, for the DeepSpeed builder in
# CI) takes the host's own repositories with the suite swapped, so whatever mirror
# the host uses keeps working; DEBIAN_COMPONENTS picks the components (e.g.
# "main contrib non-free" for nvidia-cuda-toolkit).
#
# Usage: ci/make-base-image.sh [--force] [--arch ARCH] [NAME]   (NAME defaults to
#        $QWEN_FT_BASE_IMAGE, i.e. qwen-ft-local/debian:bookworm, or for --arch arm64
#        $QWEN_FT_BASE_IMAGE_ARM64, i.e. qwen-ft-local/debian:bookworm-arm64)
# Does nothing when NAME already exists (for ARCH), unless --force.
#
# A foreign ARCH (arm64 on an amd64 host) is bootstrapped with `debootstrap --arch=ARCH`,
# whose second stage runs under qemu-user-static (ci/setup-host.sh registers it), and
# imported by building `FROM scratch` + `ADD rootfs.tar /` with `--platform linux/ARCH`:
# `docker import` would label the image with the host's architecture, and BuildKit would
# then refuse it (or pick the wrong one) for a `--platform linux/ARCH` build.
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

force=0
HOST_ARCH=$(dpkg --print-architecture)
ARCH=$HOST_ARCH
while (($#)); do
    case $1 in
    --force) force=1 ;;
    --arch) ARCH=${2:?--arch needs a Debian architecture (amd64, arm64)}; shift ;;
    --arch=*) ARCH=${1#--arch=} ;;
    -*) die "unknown option $1" ;;
    *) break ;;
    esac
    shift
done
case $ARCH in
amd64 | arm64) ;;
*) die "--arch $ARCH: expected amd64 or arm64" ;;
esac
if [[ $ARCH == arm64 ]]; then
    NAME=${1:-$QWEN_FT_BASE_IMAGE_ARM64}
else
    NAME=${1:-$QWEN_FT_BASE_IMAGE}
fi
FOREIGN=0
[[ $ARCH == "$HOST_ARCH" ]] || FOREIGN=1

daemon_answers || die "dockerd does not answer; run ci/start-services.sh first"
if ((FOREIGN)); then
    binfmt_ready "$ARCH" || die "no binfmt_misc entry with the F flag runs $ARCH binaries; run ci/setup-host.sh"
fi

if ((!force)) && docker_cli image inspect "$NAME" >/dev/null 2>&1; then
    have=$(docker_cli image inspect -f '{{.Architecture}}' "$NAME")
    if [[ $have == "$ARCH" ]]; then
        log "$NAME exists ($(docker_cli image inspect -f '{{.Id}}' "$NAME" | cut -c1-19), $have); nothing to do"
        exit 0
    fi
    log "$NAME exists but is $have, not $ARCH: rebuilding it"
fi

ROOT=$(mktemp -d /var/tmp/qwen-ft-rootfs.XXXXXX)
CTX=""
cleanup() {
    rm -rf --one-file-system "$ROOT"
    [[ -z $CTX ]] || rm -rf "$CTX"
}
trap cleanup EXIT

HOST_SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
# The host's configured repository for the suite (or for its own suite, when the image
# is of another one), else debootstrap's own default.
mirror=$DEBIAN_MIRROR
if [[ -z $mirror ]]; then
    mirror=$(host_repos | awk -v s="$DEBIAN_SUITE" '$2 == s {print $1; exit}')
fi
if [[ -z $mirror && -n $HOST_SUITE ]]; then
    mirror=$(host_repos | awk -v s="$HOST_SUITE" '$2 == s {print $1; exit}')
fi
log "debootstrap --variant=minbase --arch=$ARCH $DEBIAN_SUITE $ROOT ${mirror:-(the debootstrap default mirror)}"
if ! debootstrap --variant=minbase --arch="$ARCH" --components="${DEBIAN_COMPONENTS// /,}" \
    "$DEBIAN_SUITE" "$ROOT" ${mirror:+"$mirror"} \
    >"$ROOT.log" 2>&1; then
    tail -n 30 "$ROOT.log" >&2
    [[ -f $ROOT/debootstrap/debootstrap.log ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (full log $ROOT.log)"
fi
rm -f "$ROOT.log"

log "configuring the rootfs"
# APT sources: the host's own (its mirror, its suites), or DEBIAN_MIRROR when given.
rm -f "$ROOT/etc/apt/sources.list" "$ROOT"/etc/apt/sources.list.d/*
if [[ -n $DEBIAN_MIRROR ]]; then
    cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $DEBIAN_SUITE $DEBIAN_SUITE-updates
Components: $DEBIAN_COMPONENTS
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
elif [[ $DEBIAN_SUITE != "$HOST_SUITE" || $DEBIAN_COMPONENTS != main ]]; then
    # One deb822 stanza per host repository of the host's suite family (X, X-updates,
    # X-security), with the suite swapped and the components asked for.
    host_repos | awk -v from="$HOST_SUITE" -v to="$DEBIAN_SUITE" -v comps="$DEBIAN_COMPONENTS" '
        index($2, from) == 1 && ($2 == from || substr($2, length(from) + 1, 1) == "-") {
            printf "Types: deb\nURIs: %s\nSuites: %s%s\nComponents: %s\n", $1, to, substr($2, length(from) + 1), comps
            print "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        }' >"$ROOT/etc/apt/sources.list.d/debian.sources"
    [[ -s $ROOT/etc/apt/sources.list.d/debian.sources ]] ||
        die "no '$HOST_SUITE' repository in the host's apt sources to derive $DEBIAN_SUITE from"
else
    [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list"
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && cp "$f" "$ROOT/etc/apt/sources.list.d/"
    done
fi

# The same apt.conf.d snippets as the official debian images (debuerreotype).
conf=$ROOT/etc/apt/apt.conf.d
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$conf/docker-autoremove-suggests"
printf 'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n' >"$conf/docker-clean"
echo 'Acquire::GzipIndexes "true";' >"$conf/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$conf/docker-no-languages"
# CI only: do not fail on a Release file whose Valid-Until has passed (a
# mirror snapshot or a skewed clock); this host's own apt is set up the same.
printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' \
    >"$conf/99qwen-ft-ci"

# Services must never start inside image builds.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"

# Docker provides these at run time; drop what debootstrap copied from the host.
rm -f "$ROOT/etc/resolv.conf" "$ROOT/etc/hostname"
: >"$ROOT/etc/hosts"
[[ -e $ROOT/etc/machine-id ]] && : >"$ROOT/etc/machine-id"
# Caches and logs of the bootstrap.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
    "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/ldconfig/aux-cache \
    "$ROOT"/var/log/apt/* "$ROOT"/var/log/dpkg.log "$ROOT"/var/log/alternatives.log \
    "$ROOT"/var/log/bootstrap.log "$ROOT"/tmp/* "$ROOT"/var/tmp/*
mkdir -p "$ROOT/var/lib/apt/lists/partial"

DESCRIPTION="Debian $DEBIAN_SUITE minbase ($ARCH), built by ci/make-base-image.sh"
if ((FOREIGN)); then
    log "docker build --platform linux/$ARCH (FROM scratch, ADD rootfs.tar) -> $NAME"
    CTX=$(mktemp -d /var/tmp/qwen-ft-rootfs-ctx.XXXXXX)
    tar -C "$ROOT" --numeric-owner -cf "$CTX/rootfs.tar" .
    printf 'FROM scratch\nADD rootfs.tar /\nLABEL org.opencontainers.image.description="%s"\nCMD ["bash"]\n' \
        "$DESCRIPTION" >"$CTX/Dockerfile"
    DOCKER_BUILDKIT=1 docker_cli build -q --platform "linux/$ARCH" -t "$NAME" "$CTX" >/dev/null
    have=$(docker_cli image inspect -f '{{.Os}}/{{.Architecture}}' "$NAME")
    [[ $have == "linux/$ARCH" ]] || die "$NAME came out as $have, not linux/$ARCH"
else
    log "docker import -> $NAME"
    tar -C "$ROOT" --numeric-owner -c . |
        docker_cli import \
            --change 'CMD ["bash"]' \
            --change "LABEL org.opencontainers.image.description=\"$DESCRIPTION\"" \
            - "$NAME" >/dev/null
fi

# shellcheck disable=SC2016  # expanded by the container's shell
docker_cli run --rm --pull never --platform "linux/$ARCH" "$NAME" sh -c '. /etc/os-release && echo "  $PRETTY_NAME ($(cat /etc/debian_version), $(uname -m))"'
size=$(docker_cli image inspect -f '{{.Size}}' "$NAME")
log "built $NAME ($(docker_cli image inspect -f '{{.Id}}' "$NAME" | cut -c1-19), $((size / 1000000)) MB)"
