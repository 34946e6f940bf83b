#!/usr/bin/env bash
# Builds the mxq container image without a registry: compiles a static
# binary here (CGO_ENABLED=0) and packs it into the Dockerfile's "local"
# stage, which is FROM scratch and needs no pull.
#
#   MXQ_IMAGE   tag of the image (default mxq:dev)
#   VERSION     org.opencontainers.image.version (default: git describe)
#
# Prints the image's tag on the last line of stdout. The normal multi-stage
# build (Go image + distroless) is `docker build -t mxq .` where a registry
# is reachable; see the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
image=${MXQ_IMAGE:-mxq:dev}

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
version=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# A private build context per run: concurrent builds (tests) do not share
# files, and the daemon gets a few MB instead of the repository.
ctx=$(mktemp -d "${TMPDIR:-/tmp}/mxq-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/deploy/docker"
cp -R deploy/docker/rootfs deploy/docker/mxq.yaml "$ctx/deploy/docker/"
mkdir -p "$ctx/deploy/docker/data" "$ctx/deploy/docker/rootfs/usr/local/bin" \
	"$ctx/deploy/docker/rootfs/tmp" "$ctx/deploy/docker/rootfs/etc/ssl/certs"
chmod 1777 "$ctx/deploy/docker/rootfs/tmp"
# CA certificates, for deliveries and DSNs over SMTP with STARTTLS.
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
	if [ -f "$ca" ]; then
		cp "$ca" "$ctx/deploy/docker/rootfs/etc/ssl/certs/ca-certificates.crt"
		break
	fi
done

CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags '-s -w' \
	-o "$ctx/deploy/docker/rootfs/usr/local/bin/mxq" ./cmd/mxq

# With BuildKit only the target is built; with the legacy builder (Engine
# 20.10, no buildx) every stage up to the target: "local" is the first, so
# in neither case is anything else built or pulled.
docker build --target local \
	--build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg CREATED="$created" \
	-f "$root/Dockerfile" -t "$image" "$ctx" >&2
echo "$image"
