#!/usr/bin/env bash
# Sets up Docker for Hearth's sandbox on a Debian machine (root), idempotently:
#   1. installs the engine (docker.io) and debootstrap when missing;
#   2. starts the engine when it is not answering (systemd when it runs the machine, else dockerd in the
#      background, logging to $HEARTH_DOCKERD_LOG);
#   3. produces the base image hearth/base:bookworm locally (debootstrap --variant=minbase + docker import),
#      because no image registry may be reachable; the rootfs tarball is cached in $HEARTH_CACHE_DIR.
#      The Debian mirror is $HEARTH_DEBIAN_MIRROR, else the one the host's own apt uses
#      (scripts/apt_mirror.py), else deb.debian.org. The image's apt keeps using that mirror, so the base
#      (and the tarball) is rebuilt when the mirror changes, and only then: the mirror each was built
#      from is read back from its /etc/apt/sources.list;
#   4. builds every sandbox/images/<name>/Dockerfile as hearth/<name>:latest, skipping an image whose
#      build context and base are unchanged (a label on the image records their hash). An image folder
#      with a requirements.txt is built with a wheelhouse beside it (`wheels/`, made on the host with the
#      project's pip, cached in $HEARTH_CACHE_DIR): the host reaches the package index, a build may not.
#      A Dockerfile marked `# hearth-image: gpu` is built only where an NVIDIA GPU answers (nvidia-smi).
# Prints each image's ID (sha256:...): the node runs images by that ID, not by tag.
# A second run, with everything in place, takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${HEARTH_CACHE_DIR:-/var/cache/hearth}"
DOCKERD_LOG="${HEARTH_DOCKERD_LOG:-/var/log/hearth-dockerd.log}"
DEFAULT_MIRROR=http://deb.debian.org/debian
MIRROR=""  # choose_mirror sets it
SUITE=bookworm
BASE_TAG="hearth/base:$SUITE"
ROOTFS_TAR="$CACHE_DIR/debian-$SUITE-minbase.tar.gz"
ENGINE_WAIT_SECONDS=60
IMAGES_DIR=sandbox/images
CONTEXT_LABEL=hearth.context_sha256
PIP="${HEARTH_PIP:-.venv/bin/pip}"

ROOTFS_TMP=""

log() { printf '\033[1m[docker]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[docker]\033[0m %s\n' "$*" >&2; exit 1; }

# A failed debootstrap leaves no half-built rootfs behind (nor anything it mounted there).
cleanup() {
  [[ -n "$ROOTFS_TMP" && -d "$ROOTFS_TMP" ]] || return 0
  umount -R "$ROOTFS_TMP/proc" "$ROOTFS_TMP/sys" 2>/dev/null || true
  rm -rf --one-file-system "$ROOTFS_TMP"
}
trap cleanup EXIT

[[ $EUID -eq 0 ]] || die "run as root: it installs packages, starts the engine and builds images"

install_packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v python3 >/dev/null || need+=(python3)  # scripts/apt_mirror.py
  ((${#need[@]})) || return 0
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

engine_up() { docker info >/dev/null 2>&1; }

start_engine() {
  engine_up && return 0
  if [[ -d /run/systemd/system ]]; then
    log "starting docker.service"
    systemctl start docker.service
  else
    log "starting dockerd in the background (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # An engine that died leaves its pid file behind, and a new one refuses to start over it.
    if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
      rm -f /var/run/docker.pid
    fi
    # setsid: the engine must outlive this script and the shell that ran it.
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  local waited=0
  until engine_up; do
    ((waited < ENGINE_WAIT_SECONDS * 2)) || die "the engine did not answer in ${ENGINE_WAIT_SECONDS}s; see $DOCKERD_LOG"
    sleep 0.5
    waited=$((waited + 1))
  done
  log "engine ready ($(docker version --format '{{.Server.Version}}'))"
}

choose_mirror() {
  local from
  if [[ -n "${HEARTH_DEBIAN_MIRROR:-}" ]]; then
    MIRROR=$HEARTH_DEBIAN_MIRROR from="HEARTH_DEBIAN_MIRROR"
  elif MIRROR="$(python3 scripts/apt_mirror.py "${HEARTH_APT_DIR:-/etc/apt}")"; then
    from="the host's apt sources in ${HEARTH_APT_DIR:-/etc/apt}"
  else
    MIRROR=$DEFAULT_MIRROR from="the default: no Debian archive in ${HEARTH_APT_DIR:-/etc/apt}"
  fi
  MIRROR="${MIRROR%/}"
  log "Debian mirror $MIRROR ($from)"
}

# The archive an apt sources.list on stdin reads first (debootstrap writes that line), without a trailing /.
first_deb_uri() { awk '$1 == "deb" && uri == "" { uri = $2 } END { sub("/$", "", uri); print uri }'; }

# The mirror the base image (or the cached tarball) was built from; empty when that cannot be read.
image_mirror() {
  local id
  id="$(docker create --pull never "$BASE_TAG")" || return 0
  docker cp "$id:/etc/apt/sources.list" - 2>/dev/null | tar -xO | first_deb_uri || true
  docker rm "$id" >/dev/null
}
tarball_mirror() { tar -xzOf "$ROOTFS_TAR" ./etc/apt/sources.list 2>/dev/null | first_deb_uri || true; }

build_rootfs_tarball() {
  if [[ -s "$ROOTFS_TAR" ]]; then
    local cached
    cached="$(tarball_mirror)"
    [[ "$cached" == "$MIRROR" ]] && return 0
    log "the cached rootfs came from ${cached:-an unknown mirror}: building it again"
    rm -f "$ROOTFS_TAR"
  fi
  log "debootstrap --variant=minbase $SUITE from $MIRROR (cached in $CACHE_DIR)"
  mkdir -p "$CACHE_DIR"
  ROOTFS_TMP="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
  local root=$ROOTFS_TMP
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $CACHE_DIR/debootstrap.log"
  # Security updates keep the workload images patched; the image ID pins what a job actually ran on.
  echo "deb ${MIRROR%/debian}/debian-security $SUITE-security main" >>"$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar --numeric-owner --xattrs -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -czf "$ROOTFS_TAR.partial" .
  mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
  cleanup
  ROOTFS_TMP=""
}

import_base() {
  if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    local built
    built="$(image_mirror)"
    if [[ "$built" == "$MIRROR" ]]; then
      log "$BASE_TAG present"
      return 0
    fi
    log "$BASE_TAG came from ${built:-an unknown mirror}: building it again from $MIRROR"
  fi
  build_rootfs_tarball
  log "docker import $ROOTFS_TAR as $BASE_TAG"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$ROOTFS_TAR" "$BASE_TAG" >/dev/null
}

context_hash() {
  local dir=$1
  {
    docker image inspect --format '{{.Id}}' "$BASE_TAG"
    (cd "$dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-64
}

gpu_only() { grep -q '^# hearth-image: gpu' "$1"; }

has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

# The folder to build from: the image folder itself, or a copy of it with the wheelhouse its
# requirements.txt names (hard links: no bytes are copied).
build_context() {
  local dir=$1 name=$2
  [[ -f "$dir/requirements.txt" ]] || { echo "$dir"; return 0; }
  local wheels="$CACHE_DIR/wheelhouse/$name" stamp context="$CACHE_DIR/context-$name"
  stamp="$wheels/.requirements.$(sha256sum "$dir/requirements.txt" | cut -c1-16)"
  if [[ ! -f "$stamp" ]]; then
    [[ -x "$PIP" ]] || die "$PIP is missing: run scripts/setup.sh (it creates .venv) first"
    log "wheelhouse for $name from $dir/requirements.txt (output in $CACHE_DIR/wheels-$name.log)" >&2
    rm -rf "$wheels"; mkdir -p "$wheels"
    "$PIP" wheel --prefer-binary -w "$wheels" -r "$dir/requirements.txt" >"$CACHE_DIR/wheels-$name.log" 2>&1 ||
      die "making the wheelhouse for $name failed; see $CACHE_DIR/wheels-$name.log"
    touch "$stamp"
  fi
  rm -rf "$context"; mkdir -p "$context"
  cp -a "$dir/." "$context/"
  cp -al "$wheels" "$context/wheels"
  echo "$context"
}

build_images() {
  local dockerfile dir name tag want have context
  shopt -s nullglob
  for dockerfile in "$IMAGES_DIR"/*/Dockerfile; do
    dir="$(dirname "$dockerfile")"
    name="$(basename "$dir")"
    tag="hearth/$name:latest"
    if gpu_only "$dockerfile" && ! has_gpu; then
      log "$tag skipped: it is for NVIDIA GPUs and none answers here"
      continue
    fi
    want="$(context_hash "$dir")"
    have="$(docker image inspect --format "{{ index .Config.Labels \"$CONTEXT_LABEL\" }}" "$tag" 2>/dev/null || true)"
    if [[ "$have" == "$want" ]]; then
      log "$tag up to date"
      continue
    fi
    mkdir -p "$CACHE_DIR"
    context="$(build_context "$dir" "$name")"
    log "building $tag (output in $CACHE_DIR/build-$name.log)"
    # No buildx plugin is assumed: the classic builder ships with every engine.
    DOCKER_BUILDKIT=0 docker build --label "$CONTEXT_LABEL=$want" -t "$tag" "$context" \
      >"$CACHE_DIR/build-$name.log" 2>&1 || die "building $tag failed; see $CACHE_DIR/build-$name.log"
    [[ "$context" == "$dir" ]] || rm -rf "$context"
  done
}

print_ids() {
  local tag
  for tag in "$BASE_TAG" $(docker image ls --format '{{.Repository}}:{{.Tag}}' --filter 'reference=hearth/*:latest'); do
    log "$tag -> $(docker image inspect --format '{{.Id}}' "$tag")"
  done
}

install_packages
choose_mirror
start_engine
import_base
build_images
print_ids
log "ready"
