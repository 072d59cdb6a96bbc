#!/usr/bin/env bash
# Build a local Debian bookworm base image without pulling from any registry:
#   debootstrap --variant=minbase bookworm ROOT $DEBIAN_MIRROR
#   tar -C ROOT -c . | docker import - NAME
# then tidy it up like the official debian:bookworm image (deb822 sources for
# bookworm, bookworm-updates and bookworm-security; the docker-* apt.conf.d
# snippets; a policy-rc.d; no apt lists, no resolv.conf).
#
# Usage: ci/make-base-image.sh [--force] [NAME]   (NAME defaults to
#        $QWEN_FT_BASE_IMAGE, i.e. qwen-ft-local/debian:bookworm)
# Does nothing when NAME already exists, unless --force.
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

force=0
if [[ ${1:-} == --force ]]; then
    force=1
    shift
fi
NAME=${1:-$QWEN_FT_BASE_IMAGE}

daemon_answers || die "dockerd does not answer; run ci/start-services.sh first"

if ((!force)) && docker_cli image inspect "$NAME" >/dev/null 2>&1; then
    log "$NAME exists ($(docker_cli image inspect -f '{{.Id}}' "$NAME" | cut -c1-19)); nothing to do"
    exit 0
fi

ROOT=$(mktemp -d /var/tmp/qwen-ft-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$ROOT"; }
trap cleanup EXIT

# The host's configured repository for the suite, else debootstrap's own default.
mirror=$DEBIAN_MIRROR
if [[ -z $mirror ]]; then
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v s="$DEBIAN_SUITE" '$2 == s {print $1; exit}')
fi
log "debootstrap --variant=minbase $DEBIAN_SUITE $ROOT ${mirror:-(the debootstrap default mirror)}"
if ! debootstrap --variant=minbase "$DEBIAN_SUITE" "$ROOT" ${mirror:+"$mirror"} \
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
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
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

log "docker import -> $NAME"
tar -C "$ROOT" --numeric-owner -c . |
    docker_cli import \
        --change 'CMD ["bash"]' \
        --change "LABEL org.opencontainers.image.description=\"Debian $DEBIAN_SUITE minbase, built by ci/make-base-image.sh\"" \
        - "$NAME" >/dev/null

# shellcheck disable=SC2016  # expanded by the container's shell
docker_cli run --rm --pull never "$NAME" sh -c '. /etc/os-release && echo "  $PRETTY_NAME ($(cat /etc/debian_version))"'
size=$(docker_cli image inspect -f '{{.Size}}' "$NAME")
log "built $NAME ($(docker_cli image inspect -f '{{.Id}}' "$NAME" | cut -c1-19), $((size / 1000000)) MB)"
