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
log "debootstrap --variant=minbase $DEBIAN_SUITE $ROOT ${mirror:-(the debootstrap default mirror)}"
if ! debootstrap --variant=minbase --components="${DEBIAN_COMPONENTS// /,}" \
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
