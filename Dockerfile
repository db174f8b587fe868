# Shoal node image: build in a full Rust image, run as a non-root user in a slim one.
#   docker build -t shoal .
#   docker run --network host --stop-timeout 30 -v shoal-data:/data shoal node --gateway 0.0.0.0:8080
# On the default bridge network the node announces the container's address, which peers cannot
# dial: publish the port (-p 4737:4737/udp) and pass --external /ip4/PUBLIC-IP/udp/4737/quic-v1.
# --stop-timeout 30: time to end uploads and flush the store. A host directory mounted at /data
# must be writable by uid 10001.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin shoal

FROM debian:bookworm-slim
# The data directory is the node user's alone: the store's file names are the hashes it holds.
RUN useradd --system --home-dir /data --create-home --uid 10001 shoal && chmod 700 /data
COPY --from=build /src/target/release/shoal /usr/local/bin/shoal
USER shoal
ENV SHOAL_DATA_DIR=/data
VOLUME ["/data"]
# QUIC (UDP) for peers; the API stays on the container's loopback unless --api says otherwise.
EXPOSE 4737/udp
ENTRYPOINT ["shoal"]
CMD ["node"]
