# ccmail worker image. Build: docker build -t ccmail .
# Both stages use Debian 12 (bookworm), so the binary runs against the glibc it was built with.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The manifest names the integration-test target, so tests/ comes along (cargo checks target
# paths), and worker/ holds the workspace member worker/lab; only the ccmail binary is built,
# the lab (a dev-dependency) is not.
COPY Cargo.toml Cargo.lock build.rs ./
COPY worker ./worker
COPY migrations ./migrations
COPY tests ./tests
RUN cargo build --release --locked -p ccmail --bin ccmail

FROM debian:bookworm-slim
# No CA package: ccmail verifies the token endpoint and the POP3 servers against the Mozilla
# roots compiled into the binary (webpki-roots), plus any ca_bundle a pilot names.
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin ccmail
WORKDIR /app
COPY --from=build /src/target/release/ccmail /usr/local/bin/ccmail
# The migrations are embedded in the binary; the copies document the schema the image applies.
COPY migrations ./migrations
# Settings: mount your own as /app/config/ccmail.toml, or use CCMAIL_* variables.
COPY config/ccmail.example.toml ./config/ccmail.example.toml
ENV CCMAIL_HTTP_LISTEN=0.0.0.0:9898 \
    CCMAIL_API_LISTEN=0.0.0.0:9899 \
    CCMAIL_LOG_FORMAT=json
USER 10001:10001
# 9898: /metrics and health; 9899: the agents' API (keys from `ccmail api-key create`).
EXPOSE 9898 9899
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["ccmail", "healthcheck"]
ENTRYPOINT ["ccmail"]
CMD ["run"]
