#!/usr/bin/env bash
# `make test-docker`: build docker/Dockerfile.cpu from the lock with podman and smoke-test the
# image (docker/ci/smoke_image.py). Everything that only this kind of machine needs is supplied
# here, at test time, and never lands in the repository:
#   - podman's runtime settings (runc + cgroupfs: crun fails on these VMs' hybrid cgroups), in a
#     containers.conf of our own under .cache/ (CONTAINERS_CONF), not in /etc;
#   - a stand-in for `python:3.11-slim` (no image registry is reachable): Debian bookworm's
#     Python 3.11 from the Debian mirror (mmdebstrap), swapped in with `podman build --from`;
#   - the host's CA bundle (outbound TLS may be intercepted), bind-mounted into the build steps;
#   - the CPU torch wheel kept on disk (/opt/wheels), served to the Dockerfile's own
#     TORCH_INDEX_URL build argument as a one-package file:// index.
# Without podman: outside CI a message and exit 0; under CI=true the tools are installed from
# Debian's archive (CI machines start bare), and a failure to get them fails the target.
set -euo pipefail
cd "$(dirname "$0")/../.."

REPO=$PWD
CACHE=${SPARSE_SERVE_DOCKER_CACHE:-$REPO/.cache/docker-test}
IMAGE=${SPARSE_SERVE_TEST_IMAGE:-localhost/sparse-serve:cpu-test}
BASE=localhost/sparse-serve-ci/python:3.11-bookworm
RAW_BASE=localhost/sparse-serve-ci/debian-python-raw:bookworm
WHEELS=${TORCH_WHEEL_DIR:-/opt/wheels}
TOOLS=(podman runc mmdebstrap)
PY=${PYTHON:-python3}

log() { printf '[test-docker %(%H:%M:%S)T] %s\n' -1 "$*"; }

missing_tools() {
  local tool missing=()
  for tool in "${TOOLS[@]}"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  echo "${missing[*]}"
}

if [[ -n "$(missing_tools)" ]]; then
  if [[ "${CI:-}" != "true" ]]; then
    log "SKIPPED: $(missing_tools) not found (apt-get install podman runc mmdebstrap uidmap \
slirp4netns fuse-overlayfs); under CI=true they are installed (or the target fails)"
    exit 0
  fi
  log "CI: installing $(missing_tools) from Debian's archive"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs >/dev/null
  if [[ -n "$(missing_tools)" ]]; then
    log "FAILED: still missing after apt-get: $(missing_tools)"
    exit 1
  fi
fi

mkdir -p "$CACHE"
# NOTE: podman reads only this file when CONTAINERS_CONF is set; the ulimits keep the container
# under the host's hard open-files limit (podman's default asks for more than these VMs allow).
cat > "$CACHE/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$CACHE/containers.conf

started=$SECONDS
if ! podman image exists "$BASE"; then
  if ! podman image exists "$RAW_BASE"; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "base: mmdebstrap bookworm from $mirror"
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
      bookworm "$CACHE/base.tar" "$mirror"
    podman import --quiet "$CACHE/base.tar" "$RAW_BASE" >/dev/null
    rm -f "$CACHE/base.tar"
  fi
  # NOTE: what makes Debian's Python behave like the official image's for our Dockerfile: pip
  # may install into the system Python (Debian's refuses by default), and it trusts the system
  # CA bundle (the official image's pip uses certifi's; here the host's bundle is mounted over it).
  mkdir -p "$CACHE/base-context"
  cat > "$CACHE/base-context/Containerfile" <<CF
FROM $RAW_BASE
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CF
  podman build --quiet -t "$BASE" "$CACHE/base-context" >/dev/null
fi
log "base image ready ($((SECONDS - started)) s)"

build_args=()
mounts=()
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile.cpu)
wheel=$(ls "$WHEELS"/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [[ -n "$wheel" ]]; then
  # A PEP 503 index holding the one wheel: the Dockerfile's own TORCH_INDEX_URL path is used.
  index=$CACHE/torch-index/simple/torch
  mkdir -p "$index"
  [[ -e "$index/$(basename "$wheel")" ]] || ln "$wheel" "$index/" 2>/dev/null || cp "$wheel" "$index/"
  printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' \
    "$(basename "$wheel" | sed 's/+/%2B/')" "$(basename "$wheel")" > "$index/index.html"
  mounts+=(--volume "$CACHE/torch-index:/run/torch-index:ro")
  build_args+=(--build-arg TORCH_INDEX_URL=file:///run/torch-index/simple)
fi
[[ -n "${PIP_INDEX_URL:-}" ]] && build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
[[ -f /etc/ssl/certs/ca-certificates.crt ]] \
  && mounts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)

log "building $IMAGE from docker/Dockerfile.cpu (${build_args[*]:-no build args})"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
build_started=$SECONDS
podman build --format docker --from "$BASE" "${build_args[@]}" "${mounts[@]}" \
  -f docker/Dockerfile.cpu -t "$IMAGE" . > "$CACHE/build.log" 2>&1 \
  || { tail -40 "$CACHE/build.log"; log "FAILED: image build (full log: $CACHE/build.log)"; exit 1; }
# NOTE: the layers stay cached for the next run; only our own superseded image goes.
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
[[ -n "$previous" && "$previous" != "$current" ]] && podman rmi "$previous" >/dev/null 2>&1 || true
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
log "image built in $((SECONDS - build_started)) s ($size)"

"$PY" -P docker/ci/smoke_image.py --image "$IMAGE"
log "passed in $((SECONDS - started)) s"
