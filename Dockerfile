# One image with every Herald binary; the Deployment picks the command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin herald-ipam --bin herald-route-speaker --bin herald-cluster-watcher

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/herald-ipam /src/target/release/herald-route-speaker /src/target/release/herald-cluster-watcher /usr/local/bin/
USER 65532:65532
WORKDIR /var/lib/herald
ENTRYPOINT ["/usr/local/bin/herald-ipam"]
