#!/usr/bin/env bash
# Compiles the gRPC API into the FileDescriptorSet that server reflection serves (src/server/reflection.ts):
# protos/ (vcpud.v1, the vendored google.rpc and the google.protobuf files they import) plus the
# grpc.health.v1 and grpc.reflection protos the server answers too, under the file names grpc's own
# servers use. Real file names, filled `dependency` lists, snake_case fields and the comments (source
# info), as buf/protoc produce them. Deterministic: the same protos and the pinned buf give the same bytes.
#
#   build-descriptors.sh [OUT]     default dist/src/descriptor-set.binpb (shipped with dist/src)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/src/descriptor-set.binpb}
buf=node_modules/.bin/buf
[ -x "$buf" ] || { echo "build-descriptors: $buf missing: run npm install (devDependency @bufbuild/buf)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$buf" build --as-file-descriptor-set -o "$tmp/api.binpb"

mkdir -p "$tmp/infra/grpc/health/v1"
cp node_modules/grpc-health-check/proto/health/v1/health.proto "$tmp/infra/grpc/health/v1/"
reflection_protos=$(node -p "require('path').join(require('path').dirname(require.resolve('@grpc/reflection/package.json')), 'build/proto/grpc/reflection')")
mkdir -p "$tmp/infra/grpc/reflection"
for v in v1 v1alpha; do cp -r "$reflection_protos/$v" "$tmp/infra/grpc/reflection/"; done
"$buf" build "$tmp/infra" --as-file-descriptor-set -o "$tmp/infra.binpb"

mkdir -p "$(dirname "$out")"
# A FileDescriptorSet is one repeated field, so two sets concatenated are the set of both files.
cat "$tmp/api.binpb" "$tmp/infra.binpb" >"$out.tmp"
mv "$out.tmp" "$out"
