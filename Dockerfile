# syntax=docker/dockerfile:1
#
# The syncra-relay container image: a multi-stage build (Rust toolchain in the first stage, only
# the binary and CA certificates in the second), running as an unprivileged user.
#
#   docker build -t syncra-relay .
#   docker run --rm -p 7443:7443 \
#       -e SYNCRA_TRANSPORT__TLS__CERT=/tls/fullchain.pem \
#       -e SYNCRA_TRANSPORT__TLS__KEY=/tls/privkey.pem \
#       -v /etc/syncra-relay/tls:/tls:ro -v syncra-data:/var/lib/syncra-relay syncra-relay
#
# Configuration is SYNCRA_* environment variables (`__` for nesting, docs/CONFIG.md), or a TOML
# file mounted into the container and named with SYNCRA_RELAY_CONFIG. The image listens on
# 0.0.0.0:7443, which the relay refuses in plaintext: give it either a certificate
# (SYNCRA_TRANSPORT__TLS__CERT/KEY, as above) or SYNCRA_TRANSPORT__BEHIND_TLS_PROXY=true with
# the proxy's address in SYNCRA_TRANSPORT__TRUSTED_PROXIES (examples/deploy/docker-compose.yml).
#
# Not built or run in this repository's CI (its machines have no container engine);
# docs/DEPLOY.md says what is and is not tested.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p syncra-relay --bin syncra-relay \
    && install -D -m 0755 target/release/syncra-relay /out/syncra-relay

FROM debian:bookworm-slim
# CA certificates: for rediss://, tls:// (NATS) and Postgres/Neon with sslmode=verify-full.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 syncra \
    && useradd --system --uid 10001 --gid syncra --no-create-home \
        --home-dir /var/lib/syncra-relay --shell /usr/sbin/nologin syncra \
    && install -d -m 0700 -o syncra -g syncra /var/lib/syncra-relay
COPY --from=build /out/syncra-relay /usr/local/bin/syncra-relay

USER 10001:10001
# The data directory holds the SQLite identity store (when used) and the token signing key.
# NO_COLOR: plain log lines for `docker logs` and log collectors.
ENV SYNCRA_LISTEN=0.0.0.0:7443 \
    SYNCRA_ADMIN_LISTEN=127.0.0.1:7444 \
    SYNCRA_DATA_DIR=/var/lib/syncra-relay \
    NO_COLOR=1
VOLUME ["/var/lib/syncra-relay"]
# Clients (WebSocket). The admin endpoint (/healthz, /metrics, plain HTTP, no authentication)
# stays on the container's loopback unless SYNCRA_ADMIN_LISTEN says otherwise.
EXPOSE 7443

# /healthz answers 200 when the broker and the store are up, 503 otherwise. The slim image has
# no curl: bash's /dev/tcp speaks the one request. The port follows SYNCRA_ADMIN_LISTEN.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "port=${SYNCRA_ADMIN_LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/${port:-7444} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM drains: sessions get `shutting_down` after their queued frames are written, for up
# to limits.drain_timeout_secs (default 5 s). Keep `docker stop -t` above that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/syncra-relay"]
CMD ["serve"]
