# One image with both binaries: `gateway` (up/serve/relay/migrate) and `worker`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gateway /src/target/release/worker /usr/local/bin/
USER nobody
ENTRYPOINT ["gateway"]
CMD ["serve"]
