# The soma-agent image: the soma-agent sidecar and kubectl-soma (which the Helm chart's restore,
# pre-upgrade backup and scheduled backup Jobs run), with the PostgreSQL client tools of one major.
#
#   docker build -t soma-backup:0.1.0 .                                   # pg_dump 15 (Debian's)
#   docker build --build-arg PG_MAJOR=17 -t soma-backup:0.1.0-pg17 .     # pg_dump 17 (PGDG)
#
# pg_dump must be at least the server's major version (the agent checks and says so), so build
# with PG_MAJOR = your server's major.
ARG PG_MAJOR=15

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles the protos in Rust: no protoc needed. The image gets the binaries without their
# debug info (README "Install" gives the sizes); the debug info stays in the `debug` stage below.
RUN cargo build --release --locked -p soma-agent -p kubectl-soma \
 && install -D -m 0755 -t /out/bin target/release/soma-agent target/release/kubectl-soma \
 && scripts/split-debuginfo.sh /out/bin/soma-agent /out/bin/kubectl-soma \
 && install -D -m 0644 -t /out/debug /out/bin/soma-agent.debug /out/bin/kubectl-soma.debug \
 && rm /out/bin/*.debug

# The debug info of the image's binaries, kept apart to symbolise a crash (gdb, addr2line, or
# RUST_BACKTRACE=1 with the file beside the binary or under /usr/lib/debug/.build-id/):
#   docker build --target debug --output type=local,dest=dist/debug .
FROM scratch AS debug
COPY --from=build /out/debug/ /

FROM debian:bookworm-slim
ARG PG_MAJOR
# bookworm ships PostgreSQL 15; any other major comes from the PostgreSQL project's apt
# repository (PGDG), set up with the script and signing key that Debian's postgresql-common
# package ships. The client package brings pg_dump, pg_restore, psql and pg_amcheck; the server
# package brings the postgres binary and amcheck that restore drills of base backups run on a
# scratch copy (never a cluster of its own: createcluster.conf stops the package from making one).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    if [ "$PG_MAJOR" != "15" ]; then \
      apt-get install -y --no-install-recommends postgresql-common; \
      /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
      apt-get update; \
    fi; \
    mkdir -p /etc/postgresql-common; \
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends "postgresql-client-$PG_MAJOR" "postgresql-$PG_MAJOR"; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 65532 soma; \
    useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin soma
COPY --from=build /out/bin/soma-agent /out/bin/kubectl-soma /usr/local/bin/
# Debian installs each major's tools under /usr/lib/postgresql/<major>/bin.
ENV SOMA_PG_BIN_DIR=/usr/lib/postgresql/${PG_MAJOR}/bin
# glibc otherwise keeps a malloc arena per thread that ever allocated and holds freed memory in
# them: with two arenas the agent's peak RSS stayed ≤ 64 MiB on every data path (bench/RESULTS.md).
ENV MALLOC_ARENA_MAX=2
# The agent listens on 127.0.0.1:50051 by default: nothing to expose, kubectl-soma port-forwards.
# A numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["soma-agent"]
