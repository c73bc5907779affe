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

FAILURE_LOGS=(agent-plain.log agent-encrypted.log garage.log pg/postgres.log)
install_cleanup

log "Soma Backup encryption benchmark: SCALE=$SCALE REPEAT=$REPEAT"
find_pg_tools
find_garage
build_soma
make_tmp_dir "$(((SCALE * 100 + RANDOM_MB * 4) * 1024 * 4))"

# --- PostgreSQL --------------------------------------------------------------------------------
start_postgres
load_pgbench "$DB"
add_incompressible_rows "$DB" "$RANDOM_MB"
db_size "$DB"

start_garage
head -c 32 /dev/urandom >"$TMP_DIR/key"
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB"
PREFIX=plain AGENT_LOG=agent-plain.log start_agent --postgres-url "$PG_URL"
PLAIN_ADDR=$AGENT_ADDR
PREFIX=encrypted AGENT_LOG=agent-encrypted.log start_agent --postgres-url "$PG_URL" --encryption-key-file "$TMP_DIR/key"
ENC_ADDR=$AGENT_ADDR
# --- measurements ------------------------------------------------------------------------------
side_by_side plain "$PLAIN_ADDR" encrypted "$ENC_ADDR"
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
