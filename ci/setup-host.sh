#!/usr/bin/env bash
# Install what the CI host needs to build images locally: Debian's Docker
# engine 20.10 (dockerd + a client with BuildKit built in), Debian's registry,
# debootstrap (for the local base image) and curl/CA certificates.
# Installs only what is missing; a second run does no apt work at all.
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

PACKAGES=(
    docker.io            # dockerd, containerd, runc, /usr/bin/docker 20.10
    docker-registry      # /usr/bin/docker-registry (distribution 2.8)
    debootstrap
    debian-archive-keyring
    ca-certificates
    curl
    iptables             # dockerd's bridge network (a dependency, listed to be explicit)
)
# Set e.g. QWEN_FT_EXTRA_PACKAGES="shellcheck" to add more.
read -r -a EXTRA <<<"${QWEN_FT_EXTRA_PACKAGES:-}"
PACKAGES+=("${EXTRA[@]}")

installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package postinst scripts from starting services (there is no init
    # system here; start-services.sh starts what we need). Most Debian
    # container images already ship this file; add it only for the install.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "all packages present: ${PACKAGES[*]}"
fi

for p in docker.io docker-registry debootstrap containerd runc; do
    printf '  %-16s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p")"
done
printf '  %-16s %s\n' "client" "$("$QWEN_FT_DOCKER" --version)"
if [[ $(command -v docker) != "$QWEN_FT_DOCKER" ]]; then
    log "note: 'docker' in PATH is $(command -v docker) ($(docker --version 2>/dev/null || echo '?'));" \
        "the ci scripts use $QWEN_FT_DOCKER"
fi
