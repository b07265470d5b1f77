# syntax=docker/dockerfile:1
# Herald's images, one target per binary (all built once, in one stage):
#   docker build --target herald-ipam -t herald-ipam .
#   docker build --target herald-route-speaker -t herald-route-speaker .
#   docker build --target herald-cluster-watcher -t herald-cluster-watcher .
#   docker build -t herald .        # the last target: every binary, as the Helm chart uses
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and the target directory live in cache mounts, so a rebuild after a source
# change compiles only Herald's crates. Binaries are stripped (no debug info, no symbols):
# a fifth of their unstripped size.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked \
        --bin herald-ipam --bin herald-route-speaker --bin herald-cluster-watcher \
    && mkdir -p /out/bin /out/data \
    && cp target/release/herald-ipam target/release/herald-route-speaker \
          target/release/herald-cluster-watcher /out/bin/

# glibc and CA certificates (Postgres over TLS, the Kubernetes API) and a shell for compose
# health checks; nothing else.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The embedded store's SQLite file lives in the working directory, owned by the user the
# process runs as.
COPY --from=build --chown=65532:65532 /out/data /var/lib/herald
WORKDIR /var/lib/herald
USER 65532:65532

FROM runtime AS herald-ipam
COPY --from=build /out/bin/herald-ipam /usr/local/bin/
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/herald-ipam"]

FROM runtime AS herald-route-speaker
COPY --from=build /out/bin/herald-route-speaker /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/herald-route-speaker"]

FROM runtime AS herald-cluster-watcher
COPY --from=build /out/bin/herald-cluster-watcher /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/herald-cluster-watcher"]

FROM runtime AS herald
COPY --from=build /out/bin/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/herald-ipam"]
