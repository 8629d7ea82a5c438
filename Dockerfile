# syntax=docker/dockerfile:1
# citapulse: multi-stage build. Build on the official Rust image with a cached
# dependency layer; run on slim Debian as a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependency layer: compile against stub sources so this layer is reused until a
# manifest or Cargo.lock changes. Every workspace member's manifest must be present;
# the daemon (default feature `demo`) also compiles citapulse-testkit.
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml ./testkit/
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src testkit/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/main.rs \
 && touch src/lib.rs testkit/src/lib.rs \
 && cargo build --release --locked --bin citapulse \
 && rm -rf src testkit/src bench/main.rs
# The real sources (sql/, static/ and clients/ are embedded into the binary).
COPY src ./src
COPY testkit ./testkit
COPY bench ./bench
COPY sql ./sql
COPY static ./static
COPY clients ./clients
RUN touch src/lib.rs src/main.rs testkit/src/*.rs \
 && cargo build --release --locked --bin citapulse \
 && strip target/release/citapulse

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin citapulse
COPY --from=build /src/target/release/citapulse /usr/local/bin/citapulse
COPY config.toml /etc/citapulse/config.toml
USER citapulse
ENV CITAPULSE_CONFIG=/etc/citapulse/config.toml \
    CITAPULSE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# The binary is its own health probe: no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["citapulse", "health"]
ENTRYPOINT ["citapulse"]
CMD ["serve"]
