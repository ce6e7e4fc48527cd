# zerocopy-operator: static-ish Rust binary on a distroless, non-root runtime.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/zerocopy-dev/zerocopy-operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p zerocopy-operator --bin zerocopy-operator \
 && cp target/release/zerocopy-operator /zerocopy-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /zerocopy-operator /usr/local/bin/zerocopy-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/zerocopy-operator"]
