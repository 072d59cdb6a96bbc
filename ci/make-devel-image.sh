#!/usr/bin/env bash
# The local stand-ins for nvidia/cuda in CI, where no container registry can be pulled:
#   $QWEN_FT_TRIXIE_IMAGE  Debian trixie minbase (ci/make-base-image.sh, main contrib non-free),
#                          standing in for nvidia/cuda:*-base-*;
#   $QWEN_FT_DEVEL_IMAGE   that base + Debian's nvidia-cuda-toolkit (nvcc 12.4: sm_50-sm_90) and
#                          g++, standing in for nvidia/cuda:*-devel-* (the DeepSpeed ops stage).
# Why trixie: PyPI's nvidia-cuda-nvcc-cu12 wheels hold only ptxas, and CUDA 13's nvcc cannot
# target sm_70; trixie non-free's toolkit is CUDA 12, like the images' torch. Both images share
# trixie's Python (3.13), as the image's stack stage and its DeepSpeed builder must.
#
# Usage: ci/make-devel-image.sh [--force]   Does nothing for an image that exists, unless --force.
set -euo pipefail
# shellcheck source=ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root

force=()
if [[ ${1:-} == --force ]]; then
    force=(--force)
fi
daemon_answers || die "dockerd does not answer; run ci/start-services.sh first"

DEBIAN_SUITE=trixie DEBIAN_COMPONENTS="main contrib non-free" \
    bash "$(dirname "${BASH_SOURCE[0]}")/make-base-image.sh" "${force[@]}" "$QWEN_FT_TRIXIE_IMAGE"

if ((${#force[@]} == 0)) && docker_cli image inspect "$QWEN_FT_DEVEL_IMAGE" >/dev/null 2>&1; then
    log "$QWEN_FT_DEVEL_IMAGE exists; nothing to do"
    exit 0
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Floating apt versions: this is a CI stand-in, pinned by the suite.
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $QWEN_FT_TRIXIE_IMAGE
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \\
 && apt-get install -y --no-install-recommends nvidia-cuda-toolkit g++ \\
 && rm -rf /var/lib/apt/lists/*
LABEL org.opencontainers.image.description="Debian trixie + nvidia-cuda-toolkit: the CI stand-in for nvidia/cuda devel"
DOCKERFILE
log "building $QWEN_FT_DEVEL_IMAGE (nvidia-cuda-toolkit from trixie non-free)"
t0=$SECONDS
DOCKER_BUILDKIT=1 docker_cli build --pull=false -q -t "$QWEN_FT_DEVEL_IMAGE" "$ctx" >/dev/null
docker_cli run --rm "$QWEN_FT_DEVEL_IMAGE" nvcc --version | tail -n 2
size=$(docker_cli image inspect -f '{{.Size}}' "$QWEN_FT_DEVEL_IMAGE")
log "built $QWEN_FT_DEVEL_IMAGE in $((SECONDS - t0)) s ($((size / 1000000)) MB)"
