# Multi-stage build of the fn-image-resolver image that deploy/ references,
# for machines with a Docker daemon. scripts/build-image.sh builds the same
# image without one (same user, entrypoint, command, environment and binary
# path; tests/it/node.rs checks).
# The runtime image has no shell or package manager and runs as non-root
# (uid 65532), matching the Deployment's restricted securityContext.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Benches, examples and tests are not part of the image; cargo still wants
# the manifest's targets to exist, so build only the binary.
COPY benches ./benches
COPY examples ./examples
COPY tests ./tests
RUN cargo build --release --locked --bin fn-image-resolver \
    && strip target/release/fn-image-resolver

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fn-image-resolver /usr/local/bin/fn-image-resolver
USER 65532:65532
ENV PATH=/usr/local/bin:/usr/bin:/bin
# mimalloc commits memory as it is used, not a whole arena up front:
# about 9 MB less resident memory at no measured throughput cost (BENCHMARKS.md).
ENV MIMALLOC_ARENA_EAGER_COMMIT=0
ENTRYPOINT ["/usr/local/bin/fn-image-resolver"]
CMD ["serve"]
