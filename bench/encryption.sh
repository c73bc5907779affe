#!/usr/bin/env bash
# Soma Backup benchmark: what encryption at rest (--encryption-key-file) costs, side by side in one
# run on the same database, store and machine.
#
# Starts a throwaway PostgreSQL and a single-node Garage S3 server on 127.0.0.1, loads a pgbench
# database (`pgbench -i -s $SCALE`, ~150 MB at the default scale 10, which zstd shrinks to about
# 1 MiB) plus $RANDOM_MB MiB of random bytea that no compressor shrinks — so the encryption has
# real bytes to seal rather than a megabyte of compressed pgbench rows — and starts two release
# soma-agents on the same cluster and bucket, one per prefix: one plain, one with a key. Then,
# alternating the two REPEAT times so warm-up and background noise hit both alike:
#   (a) kubectl-soma backup postgres --database bench          plain
#   (b) the same                                               encrypted
#   (c) kubectl-soma restore <id> --database bench_restored    plain
#   (d) the same                                               encrypted
# and the stored bytes of each. Medians and their ratios (encrypted / plain) are reported.
#
# Progress goes to stderr; a Markdown results block goes to stdout. Everything is removed on exit
# (KEEP_TMP=1 keeps the directory).
#
# Environment knobs:
#   SCALE=10                 pgbench scale factor (10 ≈ 150 MB, 100 ≈ 1.5 GB)
#   REPEAT=3                 how many rounds of (a)-(d); medians are reported
#   RANDOM_MB=256            MiB of incompressible data (table blobs) added to the database
#   PART_SIZE, PARTS_IN_FLIGHT, COMPRESSION_LEVEL, COMPRESSION_THREADS   agent knobs (unset: defaults)
#   BENCH_TMPDIR=DIR         where the data goes (default $TMPDIR or /tmp)
#   PG_BIN=DIR               PostgreSQL binaries (default: newest /usr/lib/postgresql/*/bin)
#   GARAGE_BIN=PATH          garage binary (default: garage on PATH, then ~/.cargo/bin/garage)
#   SOMA_SKIP_BUILD=1        do not run cargo; SOMA_BIN_DIR=DIR says where the binaries are
#   KEEP_TMP=1               keep the temporary directory
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-10}
REPEAT=${REPEAT:-3}
RANDOM_MB=${RANDOM_MB:-256}
DB=bench
RESTORED_DB=bench_restored
BUCKET=soma-bench
PG_SETTINGS=(
  "shared_buffers = 256MB"
  "max_wal_size = 4GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
)

unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || { echo "SCALE must be a positive integer" >&2; exit 2; }
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a positive integer" >&2; exit 2; }
[[ "$RANDOM_MB" =~ ^[0-9]+$ ]] || { echo "RANDOM_MB must be a non-negative integer" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

PG_DATA=''
as_postgres() { "$@"; } # redefined when running as root
# shellcheck disable=SC2317 # called from the EXIT trap
stop_postgres() { (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null 2>&1); }
FAILURE_LOGS=(agent-plain.log agent-encrypted.log garage.log pg/postgres.log)
install_cleanup

sql() {
  local db=$1
  shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

log "Soma Backup encryption benchmark: SCALE=$SCALE REPEAT=$REPEAT"
PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pg_dump pg_restore pgbench; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
find_garage
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH"
build_soma
make_tmp_dir "$(((SCALE * 100 + RANDOM_MB * 4) * 1024 * 4))"

# --- PostgreSQL --------------------------------------------------------------------------------
mkdir "$TMP_DIR/pg"
[[ $(id -u) -ne 0 ]] || chown postgres: "$TMP_DIR/pg"
PG_DATA="$TMP_DIR/pg/data"
PG_PORT=$(free_port) || die "no free port"
(cd / && as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync) \
  >"$TMP_DIR/initdb.log" 2>&1 || { cat "$TMP_DIR/initdb.log" >&2; die "initdb failed"; }
{
  printf '\n# soma benchmark\nlisten_addresses = '\''127.0.0.1'\''\nport = %s\nunix_socket_directories = '\''%s'\''\n' \
    "$PG_PORT" "$TMP_DIR/pg"
  printf '%s\n' "${PG_SETTINGS[@]}"
} >>"$PG_DATA/postgresql.conf"
(cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP_DIR/pg/postgres.log" -w -t 120 start) >/dev/null
at_exit stop_postgres
PG_SERVER_VERSION=$(sql postgres -c "SHOW server_version")

LOAD_S=''
log "loading: pgbench -i -s $SCALE $DB"
sql postgres -c "CREATE DATABASE $DB"
timed LOAD_S "$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" \
  >"$TMP_DIR/pgbench-init.log" 2>&1 || { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
# 1 KiB of md5 output per row: pseudo-random bytes zstd cannot shrink.
log "adding $RANDOM_MB MiB of incompressible rows (table blobs)"
sql "$DB" -c "CREATE TABLE blobs AS SELECT i, decode((SELECT string_agg(md5(random()::text || i || j), '') FROM generate_series(1, 64) j), 'hex') AS b FROM generate_series(1, $((RANDOM_MB * 1024))) i"
sql "$DB" -c "CHECKPOINT"
DB_BYTES=$(sql "$DB" -c "SELECT pg_database_size('$DB')")
DB_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
log "database $DB: $DB_PRETTY"

start_garage
head -c 32 /dev/urandom >"$TMP_DIR/key"
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB"
PREFIX=plain AGENT_LOG=agent-plain.log start_agent --postgres-url "$PG_URL"
PLAIN_ADDR=$AGENT_ADDR
PREFIX=encrypted AGENT_LOG=agent-encrypted.log start_agent --postgres-url "$PG_URL" --encryption-key-file "$TMP_DIR/key"
ENC_ADDR=$AGENT_ADDR
soma_at() {
  local addr=$1
  shift
  "$BIN_DIR/kubectl-soma" --agent "$addr" "$@"
}

# --- measurements ------------------------------------------------------------------------------
settle() { sql postgres -c "CHECKPOINT" && sync; }
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
declare -A BACKUPS=() RESTORES=() IDS=() STORED=()
t=''
for i in $(seq 1 "$REPEAT"); do
  for side in plain encrypted; do
    addr=$PLAIN_ADDR
    [[ $side == plain ]] || addr=$ENC_ADDR
    settle
    timed t soma_at "$addr" -o json backup postgres --database "$DB" >"$TMP_DIR/backup-$side-$i.json" 2>"$TMP_DIR/backup.err" ||
      { cat "$TMP_DIR/backup.err" >&2; die "backup ($side) failed"; }
    BACKUPS[$side]+="$t "
    IDS[$side]=$(json_field "$TMP_DIR/backup-$side-$i.json" id)
    STORED[$side]=$(json_field "$TMP_DIR/backup-$side-$i.json" stored_bytes)
    log "round $i/$REPEAT backup ($side): ${t}s"
  done
  for side in plain encrypted; do
    addr=$PLAIN_ADDR
    [[ $side == plain ]] || addr=$ENC_ADDR
    sql postgres -c "DROP DATABASE IF EXISTS $RESTORED_DB"
    settle
    timed t soma_at "$addr" restore "${IDS[$side]}" --database "$RESTORED_DB" >"$TMP_DIR/restore.out" 2>&1 ||
      { cat "$TMP_DIR/restore.out" >&2; die "restore ($side) failed"; }
    RESTORES[$side]+="$t "
    log "round $i/$REPEAT restore ($side): ${t}s"
  done
done
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)
# A sealed object is its compressed bytes plus an 83-byte header and a 16-byte tag per 64 KiB
# chunk (store/crypt.rs): deterministic, so computed rather than listed.
SEALED=$(awk -v b="${STORED[encrypted]}" 'BEGIN { printf "%d", b + 83 + 16 * (int(b / 65536) + 1) }')
ENC_FIRST=$(soma_at "$ENC_ADDR" -o json describe "${IDS[encrypted]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["encryption"]["key_fingerprint"])')

# shellcheck disable=SC2086 # the run lists are space-separated on purpose
{
  BP=$(median ${BACKUPS[plain]}) BE=$(median ${BACKUPS[encrypted]})
  RP=$(median ${RESTORES[plain]}) RE=$(median ${RESTORES[encrypted]})
}
collect_run_info
log "done; results follow on stdout"
cat <<EOF2

### Encryption at rest: encrypted vs plain, one run — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $GARAGE_VERSION (single node, 127.0.0.1), ${AGENT_VERSION:-soma-agent} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`SCALE=$SCALE REPEAT=$REPEAT RANDOM_MB=$RANDOM_MB$(agent_knobs) bench/encryption.sh\` (binaries: $BIN_DIR)
- **Data**: \`pgbench -i -s $SCALE\` (${LOAD_S}s to load) and $RANDOM_MB MiB of random bytea → $DB_PRETTY ($DB_BYTES bytes); compressed dump $(mib "${STORED[plain]}") MiB, all of it sealed on the encrypted side
- **Encryption**: AES-256-GCM STREAM, 64 KiB chunks, key fingerprint $ENC_FIRST; the encrypted dump is $(mib "$SEALED") MiB in the bucket ($((SEALED - ${STORED[encrypted]})) bytes more than its compressed size)

| step | plain runs (s) | encrypted runs (s) | plain median | encrypted median | encrypted / plain |
|---|---|---|---|---|---|
| backup (\`kubectl-soma backup postgres --database $DB\`) | ${BACKUPS[plain]% } | ${BACKUPS[encrypted]% } | $BP | $BE | **$(ratio "$BE" "$BP")×** |
| restore (\`kubectl-soma restore <id> --database $RESTORED_DB\`) | ${RESTORES[plain]% } | ${RESTORES[encrypted]% } | $RP | $RE | **$(ratio "$RE" "$RP")×** |
EOF2
