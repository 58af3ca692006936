# syntax=docker/dockerfile:1
# vcpud container image: `docker build -t vcpud:0.1.0 .`
#
# Written and reviewed, not built here: our machines run no Docker engine. The Helm chart under
# helm/vcpud is what CI validates; this recipe is kept deliberately plain so it can be read whole.
#
# Two stages: a full Debian (bookworm) build stage with a C++ toolchain for the node-gyp addon and
# the TypeScript compiler, and a slim runtime stage that gets only what vcpud loads at run time:
# package.json (packageRoot() looks for it), production node_modules, dist/src, protos/ (loaded at
# run time by proto-loader) and the compiled addon.

ARG NODE_VERSION=20

# ---------------------------------------------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm AS build

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

COPY binding.gyp tsconfig.json ./
COPY native ./native
COPY protos ./protos
COPY src ./src
COPY scripts/build-descriptors.sh ./scripts/build-descriptors.sh

# The addon (build/Release/vcpud_native.node), dist/ (tsconfig compiles src/; test/, bench/ and the
# other scripts are not in the build context) and dist/src/descriptor-set.binpb (what server reflection
# serves, compiled by buf). Then drop devDependencies (typescript, jest, node-gyp, buf...).
RUN npx node-gyp rebuild --nodedir=/usr/local \
 && npx tsc -p tsconfig.json \
 && bash scripts/build-descriptors.sh \
 && npm prune --omit=dev --ignore-scripts --no-audit --no-fund

# ---------------------------------------------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm-slim

# A fixed, non-root uid/gid (10001) that the Helm chart's securityContext names (runAsUser,
# runAsGroup, fsGroup). Nothing in the image belongs to it: the application files stay owned by
# root, so the process cannot modify its own code even without a read-only root filesystem.
RUN groupadd --system --gid 10001 vcpud \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vcpud \
 && install -d -o 10001 -g 10001 -m 0750 /run/vcpud

WORKDIR /app
COPY --from=build /src/package.json ./package.json
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/protos ./protos
COPY --from=build /src/dist/src ./dist/src
COPY --from=build /src/build/Release/vcpud_native.node ./build/Release/vcpud_native.node

# Read-only root filesystem: vcpud writes nothing but its Unix socket, whose default path is
# $XDG_RUNTIME_DIR/vcpud/vcpud.sock = /run/vcpud/vcpud.sock. In Kubernetes /run/vcpud is an
# emptyDir (shared with the workload in sidecar mode); the directory created above serves a plain
# `docker run` without one.
ENV NODE_ENV=production \
    XDG_RUNTIME_DIR=/run

USER 10001:10001

# 50051: gRPC API on TCP (daemonset mode, mTLS); 50052: plaintext grpc.health.v1 for probes;
# 9464: Prometheus /metrics. Each is only served when its flag asks for it.
EXPOSE 50051 50052 9464

# `vcpud`; the chart passes flags as args. vcpuctl is in the image too:
#   docker run --entrypoint node IMAGE /app/dist/src/cli/vcpuctl.js --help
ENTRYPOINT ["node", "/app/dist/src/server/main.js"]
