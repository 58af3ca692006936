# vcpud container image. Built and run by the test suite (test/docker/image.test.ts); the
# README's "Container image" section has the exact commands.
#
#   docker build --network host -t vcpud:0.1.0 .
#
# The base images default to the public node images. Where no registry is reachable (our machines),
# build arguments name local stand-ins made by scripts/provision-docker.sh instead:
#
#   docker build --network host -t vcpud:0.1.0 \
#     --build-arg BUILD_IMAGE=vcpud-standin/node:20-bookworm \
#     --build-arg RUNTIME_IMAGE=vcpud-standin/node:20-bookworm-slim .
#
# Two stages: a full Debian (bookworm) build stage with a C++ toolchain for the node-gyp addon and
# the TypeScript compiler, and a slim runtime stage that gets only what vcpud loads at run time:
# package.json (packageRoot() looks for it), production node_modules, dist/src, protos/ (loaded at
# run time by proto-loader) and the compiled addon.

ARG NODE_VERSION=20
ARG BUILD_IMAGE=node:${NODE_VERSION}-bookworm
ARG RUNTIME_IMAGE=node:${NODE_VERSION}-bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build

# build-essential and python3: node-gyp compiles native/ (C++17) against <linux/kvm.h>
# (linux-libc-dev, already in this image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, so this layer is cached until the lockfile changes.
# --ignore-scripts: no dependency needs an install script at run time, and the package's own
# `install` script builds the addon with --nodedir=/usr (the layout of our Debian machines),
# whereas node's headers in this image live under /usr/local: the addon is built explicitly below.
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund

COPY binding.gyp tsconfig.json buf.yaml ./
COPY native ./native
COPY protos ./protos
COPY src ./src
COPY scripts/build-descriptors.sh ./scripts/build-descriptors.sh

# The addon (build/Release/vcpud_native.node), dist/ (tsconfig compiles src/; test/, bench/ and the
# other scripts are not in the build context) and dist/src/descriptor-set.binpb (what server reflection
# serves, compiled by buf). Then drop devDependencies (typescript, jest, node-gyp, buf...) and what
# production dependencies hold for compilers only: node-addon-api (the addon's C++ headers) and
# @types/* (protobufjs depends on @types/node); vcpud loads neither at run time.
RUN npx node-gyp rebuild --nodedir=/usr/local --jobs max \
 && npx tsc -p tsconfig.json \
 && bash scripts/build-descriptors.sh \
 && npm prune --omit=dev --ignore-scripts --no-audit --no-fund \
 && rm -rf node_modules/node-addon-api node_modules/@types

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}

# A fixed, non-root uid/gid (10001) that the Helm chart's securityContext names (runAsUser,
# runAsGroup, fsGroup). Nothing in the image belongs to it: the application files stay owned by
# root, so the process cannot modify its own code even without a read-only root filesystem.
RUN groupadd --system --gid 10001 vcpud \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vcpud \
 && install -d -o 10001 -g 10001 -m 0750 /run/vcpud /var/lib/vcpud/snapshots

WORKDIR /app
COPY --from=build /src/package.json ./package.json
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/protos ./protos
COPY --from=build /src/dist/src ./dist/src
COPY --from=build /src/build/Release/vcpud_native.node ./build/Release/vcpud_native.node

# Read-only root filesystem: vcpud writes nothing but its Unix socket, whose default path is
# $XDG_RUNTIME_DIR/vcpud/vcpud.sock = /run/vcpud/vcpud.sock. In Kubernetes /run/vcpud is an
# emptyDir (shared with the workload in sidecar mode). The directories created above serve a plain
# `docker run`: without a volume, and with a new named volume, which Docker fills with the image
# directory's owner and mode (as fsGroup does for an emptyDir); /var/lib/vcpud/snapshots is the
# chart's --snapshot-dir.
ENV NODE_ENV=production \
    XDG_RUNTIME_DIR=/run

USER 10001:10001

# 50051: gRPC API on TCP (daemonset mode, mTLS); 50052: plaintext grpc.health.v1 for probes;
# 9464: Prometheus /metrics. Each is only served when its flag asks for it.
EXPOSE 50051 50052 9464

# `vcpud`; the chart passes flags as args. vcpuctl is in the image too:
#   docker run --entrypoint node IMAGE /app/dist/src/cli/vcpuctl.js --help
ENTRYPOINT ["node", "/app/dist/src/server/main.js"]
