# syntax=docker/dockerfile:1
# matrix-refresh-proxy container image.
#
#   docker build -t matrix-refresh-proxy .
#   docker run -p 8080:8080 --stop-timeout 45 -e MRP_UPSTREAM_URL=http://homeserver:8008 \
#              -e MRP_REDIS_URL=redis://redis:6379 matrix-refresh-proxy
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# ---- build ----
# Both base images are pinned by digest: a rebuild gets the bytes that were reviewed, whatever
# the tag points to today. The tag stays in the line for people (and Dependabot, see
# .github/dependabot.yml, which proposes digest bumps). scripts/deploy-check.sh fails on an
# unpinned FROM line. To move to a newer image:
#   docker buildx imagetools inspect rust:1-slim-bookworm          # "Digest:" of the index
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot
# rust:1 follows the newest stable release; this digest is rust 1.98.0 (Cargo.toml's
# rust-version: >= 1.88).
FROM rust:1-slim-bookworm@sha256:1469a27c125cb5a3aebfa4f4e4665d935b02fb72cc093b2c974b3d740e43f157 AS builder
WORKDIR /src
# Only what the release build reads: the lock file pins every dependency (--locked).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds; the binary is copied out of the
# cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/matrix-refresh-proxy /out/matrix-refresh-proxy

# ---- runtime ----
# glibc and libgcc (what a Rust binary links against), CA certificates, no shell, no package
# manager. Same Debian release as the builder, so the glibc versions match.
# Pinned by digest, see above.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=builder /out/matrix-refresh-proxy /usr/local/bin/matrix-refresh-proxy
COPY deploy/docker/config.yaml /etc/matrix-refresh-proxy/config.yaml
# distroless's "nonroot" user, numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 8080: client API (listen). 9090: admin listener (/metrics, /health/live, /health/ready), on
# 0.0.0.0 in the image's config; publish it to internal networks only (no `-P`).
# There is no HEALTHCHECK (no shell or HTTP client in distroless): probe /health/ready from
# outside, e.g. a Kubernetes httpGet probe on port 9090.
EXPOSE 8080 9090
# SIGTERM drains in-flight requests for up to shutdown_timeout (30 s in the image's config):
# give Docker more before it kills (`docker run --stop-timeout 45`, `docker stop --time 45`,
# compose `stop_grace_period: 45s`). A second signal exits at once.
# SIGHUP (`docker kill --signal HUP`) re-reads the config file: token lifetimes and rate limits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["matrix-refresh-proxy"]
CMD ["--config", "/etc/matrix-refresh-proxy/config.yaml"]
