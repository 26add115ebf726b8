#!/usr/bin/env bash
# Build the lacuna-webhooks image with podman, on a machine that reaches no image registry.
#
#   deploy/build-image.sh            (or `make image`)
#
# 1. Base: debootstrap a minimal Debian with python3 and its venv module, trim it, keep the
#    tarball under deploy/.build/ and import it as $BASE_IMAGE. Done once: later runs reuse the
#    imported image, or re-import the cached tarball (about a minute the first time).
# 2. Wheelhouse: the host's pip (with its own index, find-links and CA configuration) builds
#    every wheel the image needs, hatchling included, into deploy/.build/wheels. The base is the
#    same Debian release as the host's, so the host's wheels fit it.
# 3. podman build of deploy/Dockerfile with PYTHON_IMAGE=$BASE_IMAGE, the wheelhouse and the
#    host CA bundle bind-mounted read-only for the build steps, and --pull=never.
#
# Settings (environment): IMAGE (default localhost/lacuna-webhooks:latest), BASE_IMAGE,
# DEBIAN_SUITE (default: the host's, else bookworm), DEBIAN_MIRROR (default: the host's apt
# source), PYTHON (the host interpreter whose pip builds the wheels; default .venv/bin/python).
# Needs root, podman and debootstrap (apt-get install podman buildah debootstrap runc).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
BUILD="$ROOT/deploy/.build"
IMAGE="${IMAGE:-localhost/lacuna-webhooks:latest}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CA_FILE="${CA_FILE:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (podman builds with --isolation=chroot, debootstrap chroots)"
for tool in podman debootstrap; do
    command -v "$tool" > /dev/null || die "$tool not found: apt-get install podman buildah debootstrap runc"
done
[ -x "$PYTHON" ] || die "no Python at $PYTHON (run make, or set PYTHON)"

host_suite() {
    # VERSION_CODENAME of the host when it is Debian, so host-built wheels fit the base.
    if [ -r /etc/os-release ] && grep -q '^ID=debian' /etc/os-release; then
        sed -n 's/^VERSION_CODENAME=//p' /etc/os-release
    fi
}

host_mirror() {
    # The first Debian archive the host's apt uses (deb822 .sources or one-line .list), so the
    # base comes from wherever this machine is allowed to fetch packages.
    local uri
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')"
    if [ -z "$uri" ]; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

SUITE="${DEBIAN_SUITE:-$(host_suite)}"
SUITE="${SUITE:-bookworm}"
BASE_IMAGE="${BASE_IMAGE:-localhost/lacuna-webhooks-base:$SUITE}"
BASE_TAR="$BUILD/base-$SUITE.tar"
PACKAGES="python3,python3-venv,ca-certificates"

make_base_tarball() {
    local mirror rootfs
    mirror="${DEBIAN_MIRROR:-$(host_mirror)}"
    rootfs="$BUILD/rootfs-$SUITE"
    log "debootstrap $SUITE from $mirror (once; cached as ${BASE_TAR#"$ROOT"/})"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        > "$BUILD/debootstrap.log" 2>&1 || { tail -20 "$BUILD/debootstrap.log" >&2; die "debootstrap failed"; }
    # What a slim image leaves out: package caches and lists, documentation, locales.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/tmp/*
    tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$rootfs"
}

T0="$(date +%s)"
mkdir -p "$BUILD"
if podman image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE present"
else
    [ -s "$BASE_TAR" ] || make_base_tarball
    log "importing ${BASE_TAR#"$ROOT"/} as $BASE_IMAGE"
    podman import --quiet \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        "$BASE_TAR" "$BASE_IMAGE" > /dev/null
fi

WHEELS="$BUILD/wheels"
# The wheelhouse depends on pyproject.toml only (the project's own wheel is built inside the
# build from the copied sources), so it is rebuilt when that file changes.
WHEELS_KEY="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$WHEELS/.key" 2>/dev/null)" = "$WHEELS_KEY" ]; then
    log "wheelhouse up to date"
else
    log "wheelhouse (host pip)"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    # The host's pip configuration may name extra local indexes that lack some projects; pip
    # says so once per project, which is noise here. async-timeout: redis needs it below
    # Python 3.11.3, which the image's Debian Python is and the host's may not be, so the
    # host's pip would leave it out of the wheelhouse.
    if ! "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELS" "${ROOT}[postgres,brokers]" hatchling \
        "async-timeout>=4.0.3" 2>&1 |
        { grep -v -E "^WARNING: Location '.*' is ignored" || true; } >&2; then
        die "pip wheel failed"
    fi
    # Only its dependencies are needed: the project's wheel is built inside the image build.
    rm -f "$WHEELS"/lacuna_webhooks-*.whl
    printf '%s\n' "$WHEELS_KEY" > "$WHEELS/.key"
fi

log "context"
CONTEXT="$BUILD/context"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
# Modification times are kept so that unchanged sources hit the build cache.
cp -p pyproject.toml README.md CHANGELOG.md "$CONTEXT"/
tar --exclude=__pycache__ --exclude='*.pyc' -cf - service | tar -C "$CONTEXT" -xf -

# The build stage is tagged too ($IMAGE-build): tagged images keep the layer cache alive, and an
# image that a rebuild replaces is removed right away instead of piling up untagged.
build() { # build TAG [podman build options...]
    local tag="$1" previous current
    shift
    previous="$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
    podman build \
        --isolation=chroot \
        --format=docker \
        --pull=never \
        --layers \
        --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
        --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
        --build-arg WHEELHOUSE=/wheelhouse \
        --build-arg CA_BUNDLE=/etc/ssl/host-ca.crt \
        --volume "$WHEELS:/wheelhouse:ro" \
        --volume "$CA_FILE:/etc/ssl/host-ca.crt:ro" \
        --file deploy/Dockerfile \
        --tag "$tag" \
        "$@" \
        "$CONTEXT" >> "$BUILD/podman-build.log" 2>&1 ||
        { tail -30 "$BUILD/podman-build.log" >&2; die "podman build failed (log: deploy/.build/podman-build.log)"; }
    current="$(podman image inspect --format '{{.Id}}' "$tag")"
    if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
        podman rmi "$previous" > /dev/null 2>&1 || true
    fi
}

log "podman build $IMAGE"
: > "$BUILD/podman-build.log"
build "$IMAGE-build" --target build
build "$IMAGE"
log "built $IMAGE in $(( $(date +%s) - T0 ))s"
