#!/usr/bin/env bash
# Make a Debian base image for image/Dockerfile without any registry: debootstrap a minimal
# bookworm (python3, its venv module, CA certificates) and commit it with `buildah from scratch`.
# Used by the image test where no registry is reachable; also for air-gapped builds.
#
#   bash image/debian-base.sh [TAG]          default TAG: localhost/rec-base:bookworm
# Variables: MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm), WORK (scratch
# directory, default a new one under $TMPDIR). Needs root, debootstrap and buildah.
set -euo pipefail

TAG="${1:-localhost/rec-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (apt-get install $tool)" >&2; exit 2; }
done
work="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/rec-base-XXXXXX")}"
trap 'rm -rf "$work"' EXIT

echo "+ debootstrap $SUITE ($MIRROR)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$work/rootfs" "$MIRROR" >&2
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*

ctr="$(buildah from scratch)"
buildah copy "$ctr" "$work/rootfs" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
buildah commit --rm "$ctr" "$TAG" >/dev/null
echo "$TAG"
