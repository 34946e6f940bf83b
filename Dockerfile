# mxq container image.
#
# Two ways to build it:
#
#   docker build -t mxq .                    # the default: compile in GO_IMAGE,
#                                            # run on RUNTIME_IMAGE (distroless)
#   scripts/build-image.sh                   # no registry needed: compile on
#                                            # this machine, target "local"
#
# Without registry access, point the base images at images you have:
#   docker build --build-arg GO_IMAGE=my/golang:1.26 \
#                --build-arg RUNTIME_IMAGE=my/static:nonroot -t mxq .
# RUNTIME_IMAGE needs nothing but a user 65532 is allowed to run as (any
# static/distroless base; even scratch works, minus CA certificates).
#
# The "local" stage comes first on purpose: Docker's legacy builder (no
# BuildKit, e.g. Engine 20.10) builds every stage up to the target, so with
# --target local nothing below is built and no image is pulled. In the
# repository's own context it builds too (it is just never used), so the
# default build works on the legacy builder as well.

ARG GO_IMAGE=golang:1.26-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

# --- local: a binary compiled on the host (CGO_ENABLED=0), on scratch ---------
# scripts/build-image.sh puts the binary at usr/local/bin/mxq, the host's CA
# bundle and an empty tmp/ into deploy/docker/rootfs of a private context.
FROM scratch AS local
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
COPY deploy/docker/rootfs/ /
COPY deploy/docker/mxq.yaml /etc/mxq/mxq.yaml
COPY --chown=65532:65532 deploy/docker/data/ /var/lib/mxq/
ENV PATH=/usr/local/bin
USER 65532:65532
WORKDIR /var/lib/mxq
EXPOSE 2525 8025 6222 7947
VOLUME /var/lib/mxq
ENTRYPOINT ["/usr/local/bin/mxq"]
CMD ["serve", "--config", "/etc/mxq/mxq.yaml"]
LABEL org.opencontainers.image.title="mxq" \
      org.opencontainers.image.description="A durable inbound mail queue: accepts mail for your domains whether or not the mailbox store is up, delivers it at a rate the store can take." \
      org.opencontainers.image.source="https://github.com/mxq-dev/mxq" \
      org.opencontainers.image.url="https://github.com/mxq-dev/mxq" \
      org.opencontainers.image.documentation="https://github.com/mxq-dev/mxq#readme" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="scratch"

# --- build: compile in the Go image ----------------------------------------
FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/mxq ./cmd/mxq \
 && /out/mxq --help >/dev/null

# --- image (default): the binary on a minimal non-root runtime --------------
FROM ${RUNTIME_IMAGE} AS image
ARG RUNTIME_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
COPY --from=build /out/mxq /usr/local/bin/mxq
COPY deploy/docker/mxq.yaml /etc/mxq/mxq.yaml
COPY --chown=65532:65532 deploy/docker/data/ /var/lib/mxq/
USER 65532:65532
WORKDIR /var/lib/mxq
EXPOSE 2525 8025 6222 7947
VOLUME /var/lib/mxq
ENTRYPOINT ["/usr/local/bin/mxq"]
CMD ["serve", "--config", "/etc/mxq/mxq.yaml"]
LABEL org.opencontainers.image.title="mxq" \
      org.opencontainers.image.description="A durable inbound mail queue: accepts mail for your domains whether or not the mailbox store is up, delivers it at a rate the store can take." \
      org.opencontainers.image.source="https://github.com/mxq-dev/mxq" \
      org.opencontainers.image.url="https://github.com/mxq-dev/mxq" \
      org.opencontainers.image.documentation="https://github.com/mxq-dev/mxq#readme" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
