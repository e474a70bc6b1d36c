# One image with every demo binary: the saga coordinator, sagactl, the web console and the five
# demo services.
# Built by docker-compose.yml; each service runs one binary from it.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p saga-coordinator -p sagactl -p saga-console -p example-services --bins

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 saga && mkdir /auth && chown saga /auth
COPY --from=build \
    /src/target/release/saga-coordinator \
    /src/target/release/orders \
    /src/target/release/seller \
    /src/target/release/logistics \
    /src/target/release/notification \
    /src/target/release/payments \
    /src/target/release/sagactl \
    /src/target/release/saga-console \
    /usr/local/bin/
COPY example-services/sagas /etc/sagas
USER saga
ENV NATS_URL=nats://nats:4222
CMD ["saga-coordinator", "--help"]
