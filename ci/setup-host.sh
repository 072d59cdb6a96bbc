#!/usr/bin/env bash
# Install what the CI host needs to build images locally: Debian's Docker
# engine 20.10 (dockerd + a client with BuildKit built in), Debian's registry,
# debootstrap (for the local base image) and curl/CA certificates; then the
# buildx CLI plugin from the next Debian release's docker-buildx package (see
# install_buildx). Installs only what is missing; a second run does no apt work.
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

CLEANUP=()
cleanup() { ((${#CLEANUP[@]} == 0)) || rm -rf -- "${CLEANUP[@]}"; }
trap cleanup EXIT

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
        CLEANUP+=("$policy")
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "all packages present: ${PACKAGES[*]}"
fi

# buildx: bookworm has no docker-buildx package; trixie's (0.13.1) is one static-ish
# binary needing only libc6 >= 2.34, so it runs here. It is fetched by name with
# apt from the host's own Debian source line(s), with the suite swapped, so
# whatever mirror the host uses keeps working; nothing is downloaded from
# anywhere else. It goes into $DOCKER_CONFIG/cli-plugins (default
# ~/.docker/cli-plugins), not a system plugin folder: the pre-23 path
# (/usr/bin/docker with DOCKER_BUILDKIT=1) is tested by hiding that folder
# (DOCKER_CONFIG=<empty dir>), which a system folder would not allow.
BUILDX_SUITE="${BUILDX_SUITE:-trixie}"
BUILDX_PLUGIN_DIR="${BUILDX_PLUGIN_DIR:-${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins}"
BUILDX_DEB_PATH=usr/libexec/docker/cli-plugins/docker-buildx

# derived_sources FROM TO: the host's deb822 and one-line source entries for
# suite FROM (the release itself, not -updates or -security), with TO instead.
derived_sources() {
    local from=$1 to=$2 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # shellcheck disable=SC2016
        awk -v from="$from" -v to="$to" '
            function flush() { if (keep > 0) { for (i = 1; i <= n; i++) print buf[i]; print "" }
                               n = 0; keep = 0 }
            /^[[:space:]]*$/ { flush(); next }
            /^#/ { next }
            {
                key = tolower($1)
                if (key == "suites:") {
                    hit = 0
                    for (i = 2; i <= NF; i++) if ($i == from) hit = 1
                    if (hit) { keep++; $0 = "Suites: " to }
                }
                if (key == "enabled:" && tolower($2) == "no") keep = -1000
                buf[++n] = $0
            }
            END { flush() }' "$f"
    done >"$3/derived.sources"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [options] URI SUITE COMPONENTS...
        awk -v from="$from" -v to="$to" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == from) { $(i + 1) = to; print }
            }' "$f"
    done >"$3/derived.list"
}

install_buildx() {
    local plugin=$BUILDX_PLUGIN_DIR/docker-buildx
    if [[ -x $plugin ]] && "$plugin" version >/dev/null 2>&1; then
        log "buildx present: $plugin ($("$plugin" version))"
        return 0
    fi
    local host_suite tmp
    host_suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n $host_suite ]] || die "no VERSION_CODENAME in /etc/os-release; cannot derive a $BUILDX_SUITE source"
    tmp=$(mktemp -d)
    CLEANUP+=("$tmp")
    mkdir -p "$tmp/parts" "$tmp/prefs" "$tmp/lists/partial" "$tmp/archives/partial" "$tmp/deb"
    derived_sources "$host_suite" "$BUILDX_SUITE" "$tmp/parts"
    cat "$tmp/parts/derived.list" >"$tmp/sources.list"
    [[ -s $tmp/parts/derived.sources || -s $tmp/sources.list ]] ||
        die "no '$host_suite' entry in the host's apt sources to derive a $BUILDX_SUITE source from"
    # A throwaway apt state: the host's own lists, pins and sources stay as they were.
    local apt_opts=(
        -o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/parts"
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::Archives=$tmp/archives"
        -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$tmp/prefs"
        -o APT::Sandbox::User=root
    )
    log "fetching docker-buildx from $BUILDX_SUITE (the host's $host_suite source with the suite swapped)"
    apt-get "${apt_opts[@]}" update -qq
    (cd "$tmp/deb" && apt-get "${apt_opts[@]}" download -qq docker-buildx)
    local deb depends libc need
    deb=$(echo "$tmp"/deb/docker-buildx_*.deb)
    [[ -f $deb ]] || die "apt-get download docker-buildx left no .deb"
    # The only dependency is libc6 (>= X): check it rather than trust it.
    depends=$(dpkg-deb -f "$deb" Depends)
    [[ $depends =~ ^libc6\ \(\>=\ ([0-9.]+)\)$ ]] ||
        die "docker-buildx now depends on '$depends'; check it runs on $host_suite before using it"
    need=${BASH_REMATCH[1]}
    libc=$(dpkg-query -W -f='${Version}' libc6)
    dpkg --compare-versions "$libc" ge "$need" ||
        die "docker-buildx needs libc6 >= $need; this host has $libc"
    dpkg-deb -x "$deb" "$tmp/root"
    install -D -m 0755 "$tmp/root/$BUILDX_DEB_PATH" "$plugin"
    log "installed $plugin ($(dpkg-deb -f "$deb" Version), $("$plugin" version))"
}

install_buildx

for p in docker.io docker-registry debootstrap containerd runc; do
    printf '  %-16s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p")"
done
printf '  %-16s %s\n' "client" "$("$QWEN_FT_DOCKER" --version)"
if [[ $(command -v docker) != "$QWEN_FT_DOCKER" ]]; then
    log "note: 'docker' in PATH is $(command -v docker) ($(docker --version 2>/dev/null || echo '?'));" \
        "the ci scripts use $QWEN_FT_DOCKER"
fi
printf '  %-16s %s\n' "buildx" "$BUILDX_PLUGIN_DIR/docker-buildx ($("$BUILDX_PLUGIN_DIR/docker-buildx" version))"
