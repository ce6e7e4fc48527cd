# zerocopy-node-agent: runs privileged as root on every node (it mounts tmpfs
# and bind-mounts volumes into pods), so the runtime image is a small Debian.
#   docker build -f docker/node-agent.Dockerfile -t ghcr.io/zerocopy-dev/zerocopy-node-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p zerocopy-node-agent --bin zerocopy-node-agent \
 && cp target/release/zerocopy-node-agent /zerocopy-node-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /zerocopy-node-agent /usr/local/bin/zerocopy-node-agent
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/zerocopy-node-agent"]
