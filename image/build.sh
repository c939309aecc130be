#!/usr/bin/env bash
# Build the rec TPU image with docker or buildah, whichever works here (`make image`).
#
#   bash image/build.sh                      build, tagged with the env's `image` value (K8S_ENV=dev)
#   IMAGE=reg/path/rec:tag bash image/build.sh
#   PUSH=1 bash image/build.sh               also push the tag
#   bash image/build.sh --dry-run            print the build command, build nothing
#   bash image/build.sh --context-only DIR   only assemble the build context in DIR
# Variables: K8S_ENV (default dev), IMAGE, BASE_IMAGE (default python:3.12-slim-bookworm; a
# localhost/... base, e.g. from image/debian-base.sh, is used without pulling), JAX_VERSION,
# PLATFORM (default linux/amd64: TPU VMs are x86_64), ENGINE (docker|buildah; default: the first
# that works), PYTHON. buildah also reads CONTAINERS_CONF (docs/DEPLOY.md: building behind a
# TLS-intercepting proxy).
#
# The build context is assembled in a temporary directory from exactly what the image needs,
# with image/.dockerignore at its root, so docker and buildah see the same files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV="${K8S_ENV:-dev}"
PLATFORM="${PLATFORM:-linux/amd64}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DRY_RUN=0
CONTEXT_ONLY=""

while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --context-only) CONTEXT_ONLY="${2:?--context-only needs a directory}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see bash image/build.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

assemble_context() {
  local dest="$1"
  mkdir -p "$dest/image"
  cp "$ROOT/pyproject.toml" "$dest/"
  cp -R "$ROOT/rec" "$ROOT/configs" "$dest/"
  cp "$ROOT/image/Dockerfile" "$ROOT/image/entrypoint.py" "$ROOT/image/requirements-tpu.txt" "$dest/image/"
  cp "$ROOT/image/.dockerignore" "$dest/.dockerignore"
  if [ -f "$ROOT/README.md" ]; then
    cp "$ROOT/README.md" "$dest/"
  else
    # pyproject.toml names README.md as the package readme; the build needs the file to exist.
    echo "rec" > "$dest/README.md"
  fi
  # Caches never belong in the image (the .dockerignore says so too; this keeps the context small).
  find "$dest" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
}

if [ -n "$CONTEXT_ONLY" ]; then
  assemble_context "$CONTEXT_ONLY"
  echo "$CONTEXT_ONLY"
  exit 0
fi

read_image='
import sys
sys.path.insert(0, ".")
from rec.errors import RecError
from tools.deploy.values import load_env
try:
    print(load_env(sys.argv[1]).image)
except RecError as exc:
    sys.exit(f"error: {exc}")
'
if [ -z "${IMAGE:-}" ]; then
  # The tag the manifests will run: the env values' `image` (validated like every manifest value).
  IMAGE="$(cd "$ROOT" && "$PYTHON" -c "$read_image" "$ENV")" || exit 2
fi

ENGINE="${ENGINE:-}"
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v buildah >/dev/null 2>&1; then
    ENGINE=buildah
  fi
fi
if [ -z "$ENGINE" ]; then
  echo "error: no container builder: neither a running docker (docker info failed or docker is not installed) nor buildah was found; install one (e.g. apt-get install buildah) or build remotely with Cloud Build (docs/DEPLOY.md)" >&2
  exit 2
fi

build_args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim-bookworm}" --build-arg "JAX_VERSION=${JAX_VERSION:-0.10.2}")
context="$(mktemp -d "${TMPDIR:-/tmp}/rec-image-XXXXXX")"
trap 'rm -rf "$context"' EXIT
assemble_context "$context"

case "$ENGINE" in
  docker) cmd=(docker build --platform "$PLATFORM" -f "$context/image/Dockerfile" -t "$IMAGE" "${build_args[@]}" "$context") ;;
  buildah)
    # --layers: cache every step, as docker does (the dependency layer is then rebuilt only when
    # the pins change, and a push re-uploads only the code layer). A local base is never pulled.
    pull=()
    case "${BASE_IMAGE:-}" in localhost/*) pull=(--pull=never) ;; esac
    cmd=(buildah bud --layers --isolation chroot "${pull[@]}" --platform "$PLATFORM" -f "$context/image/Dockerfile" -t "$IMAGE" "${build_args[@]}" "$context") ;;
  *) echo "error: ENGINE=$ENGINE: expected docker or buildah" >&2; exit 2 ;;
esac

echo "+ ${cmd[*]}" >&2
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
"${cmd[@]}"
if [ "${PUSH:-0}" = 1 ]; then
  echo "+ $ENGINE push $IMAGE" >&2
  "$ENGINE" push "$IMAGE"
fi
echo "built $IMAGE with $ENGINE"
