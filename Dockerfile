# Shoal node image: build in a full Rust image, run as a non-root user in a slim one.
#   docker build -t shoal .
#   docker run -p 4737:4737/udp -p 8080:8080 -v shoal-data:/data shoal node --gateway 0.0.0.0:8080
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
