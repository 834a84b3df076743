# Multi-stage build of a static (musl) binary on a distroless base: no shell, no libc,
# runs as the unprivileged user 65532.
FROM rust:1.89-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin prefect-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/prefect-operator /prefect-operator
USER 65532:65532
ENTRYPOINT ["/prefect-operator"]
CMD ["run"]
