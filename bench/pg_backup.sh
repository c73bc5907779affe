#!/usr/bin/env bash
# Soma Backup benchmark: PostgreSQL backup to S3 versus a plain pg_dump, in one run, side by side.
#
# Starts a throwaway PostgreSQL and a single-node Garage S3 server on 127.0.0.1, loads a pgbench
# database (`pgbench -i -s $SCALE`, ~1.5 GB at the default scale 100), starts a release soma-agent
# against Garage and measures wall times of:
#   (a) pg_dump -Fc -Z0 -d bench > /dev/null                 the raw dump, REPEAT times
#   (b) kubectl-soma backup postgres --database bench        dump + zstd + sha256 + S3, REPEAT times,
#                                                            alternating with (a)
#   (c) kubectl-soma restore <id> --database bench_restored  S3 -> checks -> pg_restore
#   (d) pg_restore of a local pg_dump -Fc -Z0 file           for comparison (PG_RESTORE_COMPARE=0 skips)
#   (e) kubectl-soma verify <id>                             re-read and re-hash from S3
# and the agent's peak RSS (VmHWM from /proc/PID/status, reset before each operation).
#
# Progress goes to stderr; a Markdown results block goes to stdout, so
#   bench/pg_backup.sh > /tmp/results.md
# keeps just the block. Everything is removed on exit (KEEP_TMP=1 keeps the directory).
#
# Environment knobs:
#   SCALE=100                pgbench scale factor (100 ≈ 1.5 GB, 10 ≈ 150 MB)
#   REPEAT=3                 how many (a)/(b) pairs; medians are reported
#   PART_SIZE=16MiB          passed to soma-agent --part-size          (unset: agent default)
#   PARTS_IN_FLIGHT=N        passed to soma-agent --parts-in-flight     (unset: agent default)
#   COMPRESSION_THREADS=N    passed to soma-agent --compression-threads (unset: agent default)
#   COMPRESSION_LEVEL=N      passed to soma-agent --compression-level   (unset: agent default)
#   PG_RESTORE_COMPARE=1     run (d)
#   BENCH_TMPDIR=DIR         where the data goes (default $TMPDIR or /tmp); needs ~SCALE×100 MB free
#   PG_BIN=DIR               PostgreSQL binaries (default: newest /usr/lib/postgresql/*/bin)
#   GARAGE_BIN=PATH          garage binary (default: garage on PATH, then ~/.cargo/bin/garage)
#   SOMA_SKIP_BUILD=1        do not run cargo; SOMA_BIN_DIR=DIR says where the binaries are
#   KEEP_TMP=1               keep the temporary directory
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-100}
REPEAT=${REPEAT:-3}
PG_RESTORE_COMPARE=${PG_RESTORE_COMPARE:-1}
DB=bench
RESTORED_DB=bench_restored
PGRESTORE_DB=bench_pgrestore
BUCKET=soma-bench
PREFIX=pgbench
# Server settings for the run (also printed with the results).
PG_SETTINGS=(
  "shared_buffers = 512MB"
  "max_wal_size = 8GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
)

unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || { echo "SCALE must be a positive integer" >&2; exit 2; }
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a positive integer" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

# ---------------------------------------------------------------------------------------------
# Clean-up on every exit (bench/lib.sh): agent, Garage and PostgreSQL are stopped, TMP_DIR removed

# PG_DATA, as_postgres, stop_postgres and sql come from bench/lib.sh.
FAILURE_LOGS=(agent.log garage.log pg/postgres.log)
install_cleanup

# ---------------------------------------------------------------------------------------------
log "Soma Backup benchmark: SCALE=$SCALE REPEAT=$REPEAT"

PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pg_dump pg_restore pgbench; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
find_garage
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH" # the agent's pg_dump / pg_restore match the server

build_soma

# --- temp dir and disk space -------------------------------------------------------------------
make_tmp_dir "$((SCALE * 100 * 1024))"

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
log "PostgreSQL $PG_SERVER_VERSION on 127.0.0.1:$PG_PORT"

LOAD_S=''
log "loading: pgbench -i -s $SCALE $DB"
sql postgres -c "CREATE DATABASE $DB"
timed LOAD_S "$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" \
  >"$TMP_DIR/pgbench-init.log" 2>&1 || { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
sed 's/^/    /' "$TMP_DIR/pgbench-init.log" | tail -n 4 >&2
sql "$DB" -c "CHECKPOINT"
DB_BYTES=$(sql "$DB" -c "SELECT pg_database_size('$DB')")
DB_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
log "database $DB: $DB_PRETTY ($DB_BYTES bytes)"

# --- Garage S3 ---------------------------------------------------------------------------------
start_garage

# --- soma-agent ---------------------------------------------------------------------------------
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB"
start_agent --postgres-url "$PG_URL"

# --- measurements ------------------------------------------------------------------------------
RESTORE_S='' VERIFY_S='' t=''
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
DUMP_TIMES=()
BACKUP_TIMES=()
BACKUP_PEAKS_KIB=()
for i in $(seq 1 "$REPEAT"); do
  timed t "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$DB" >/dev/null ||
    die "pg_dump failed"
  DUMP_TIMES+=("$t")
  log "run $i/$REPEAT (a) pg_dump -Fc -Z0 > /dev/null: ${t}s"

  reset_peak
  timed t soma -o json backup postgres --database "$DB" >"$TMP_DIR/backup-$i.json" 2>"$TMP_DIR/backup-$i.err" ||
    { cat "$TMP_DIR/backup-$i.err" >&2; die "kubectl-soma backup failed"; }
  BACKUP_TIMES+=("$t")
  BACKUP_PEAKS_KIB+=("$(proc_kib VmHWM)")
  log "run $i/$REPEAT (b) kubectl-soma backup: ${t}s, agent VmHWM $(mib "$((BACKUP_PEAKS_KIB[-1] * 1024))") MiB"
done
MANIFEST="$TMP_DIR/backup-$REPEAT.json"
BACKUP_ID=$(json_field "$MANIFEST" id) || die "no \"id\" in the manifest printed by kubectl-soma -o json: $(head -c 600 "$MANIFEST")"
RAW_BYTES=$(json_field "$MANIFEST" raw_bytes) || die "no \"raw_bytes\" in the manifest: $(head -c 600 "$MANIFEST")"
STORED_BYTES=$(json_field "$MANIFEST" stored_bytes) || die "no \"stored_bytes\" in the manifest: $(head -c 600 "$MANIFEST")"
log "backup $BACKUP_ID: raw $RAW_BYTES bytes, stored $STORED_BYTES bytes"

# Restores write ~DB size of data and WAL: start each from a clean checkpoint and flushed disk.
settle
reset_peak
timed RESTORE_S soma restore "$BACKUP_ID" --database "$RESTORED_DB" >"$TMP_DIR/restore.out" 2>&1 ||
  { cat "$TMP_DIR/restore.out" >&2; die "kubectl-soma restore failed"; }
RESTORE_PEAK_KIB=$(proc_kib VmHWM)
log "(c) kubectl-soma restore: ${RESTORE_S}s, agent VmHWM $(mib "$((RESTORE_PEAK_KIB * 1024))") MiB"

reset_peak
timed VERIFY_S soma verify "$BACKUP_ID" >"$TMP_DIR/verify.out" 2>&1 ||
  { cat "$TMP_DIR/verify.out" >&2; die "kubectl-soma verify failed"; }
VERIFY_PEAK_KIB=$(proc_kib VmHWM)
log "(e) kubectl-soma verify: ${VERIFY_S}s, agent VmHWM $(mib "$((VERIFY_PEAK_KIB * 1024))") MiB"

# Same rows? Order-independent checksums of every pgbench table in both databases.
CHECK_SQL="SELECT (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_accounts t),
                  (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_branches t),
                  (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_tellers t),
                  (SELECT count(*) FROM pgbench_history),
                  (SELECT count(*) FROM pg_indexes WHERE schemaname = 'public')"
SRC_CHECK=$(sql "$DB" -c "$CHECK_SQL")
DST_CHECK=$(sql "$RESTORED_DB" -c "$CHECK_SQL") || DST_CHECK="(query failed)"
if [[ "$SRC_CHECK" == "$DST_CHECK" ]]; then
  RESTORE_CHECK="identical (row counts, per-table row checksums, index count)"
else
  RESTORE_CHECK="DIFFERENT: source '$SRC_CHECK', restored '$DST_CHECK'"
fi
RESTORED_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$RESTORED_DB'))" 2>/dev/null || echo "?")
log "restored database: $RESTORE_CHECK"

PGRESTORE_S=''
DUMP_FILE_BYTES=''
if [[ "$PG_RESTORE_COMPARE" == 1 ]]; then
  "$PG_BIN/pg_dump" -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$DB" -f "$TMP_DIR/bench.dump"
  DUMP_FILE_BYTES=$(stat -c %s "$TMP_DIR/bench.dump")
  sql postgres -c "CREATE DATABASE $PGRESTORE_DB"
  settle
  timed PGRESTORE_S "$PG_BIN/pg_restore" --single-transaction --exit-on-error -h 127.0.0.1 -p "$PG_PORT" \
    -U postgres -d "$PGRESTORE_DB" "$TMP_DIR/bench.dump" || die "pg_restore failed"
  rm -f "$TMP_DIR/bench.dump"
  log "(d) pg_restore --single-transaction of a local -Fc -Z0 file: ${PGRESTORE_S}s"
fi
FINAL_HWM_KIB=$(proc_kib VmHWM)
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)
MAX_PEAK_KIB=$(printf '%s\n' "${BACKUP_PEAKS_KIB[@]}" "$RESTORE_PEAK_KIB" "$VERIFY_PEAK_KIB" "$FINAL_HWM_KIB" | sort -n | tail -n 1)

# --- results -----------------------------------------------------------------------------------
DUMP_MED=$(median "${DUMP_TIMES[@]}")
BACKUP_MED=$(median "${BACKUP_TIMES[@]}")
RATIO=$(ratio "$BACKUP_MED" "$DUMP_MED")
BACKUP_PEAK_KIB=$(printf '%s\n' "${BACKUP_PEAKS_KIB[@]}" | sort -n | tail -n 1)
collect_run_info
KNOBS="SCALE=$SCALE REPEAT=$REPEAT$(agent_knobs)"
ROWS="| (a) raw dump | \`pg_dump -Fc -Z0 -d $DB > /dev/null\` | $(join_by ', ' "${DUMP_TIMES[@]}") | $DUMP_MED | $(mib_per_s "$RAW_BYTES" "$DUMP_MED") | |
| (b) soma backup → S3 | \`kubectl-soma backup postgres --database $DB\` | $(join_by ', ' "${BACKUP_TIMES[@]}") | $BACKUP_MED | $(mib_per_s "$RAW_BYTES" "$BACKUP_MED") | $(mib "$((BACKUP_PEAK_KIB * 1024))") MiB |
| (c) soma restore ← S3 | \`kubectl-soma restore <id> --database $RESTORED_DB\` | $RESTORE_S | $RESTORE_S | $(mib_per_s "$RAW_BYTES" "$RESTORE_S") | $(mib "$((RESTORE_PEAK_KIB * 1024))") MiB |"
if [[ -n "$PGRESTORE_S" ]]; then
  ROWS+="
| (d) pg_restore of a local dump | \`pg_restore --single-transaction --exit-on-error -d $PGRESTORE_DB bench.dump\` (from \`pg_dump -Fc -Z0\`, $(mib "$DUMP_FILE_BYTES") MiB) | $PGRESTORE_S | $PGRESTORE_S | $(mib_per_s "$RAW_BYTES" "$PGRESTORE_S") | |"
fi
ROWS+="
| (e) soma verify | \`kubectl-soma verify <id>\` | $VERIFY_S | $VERIFY_S | $(mib_per_s "$RAW_BYTES" "$VERIFY_S") | $(mib "$((VERIFY_PEAK_KIB * 1024))") MiB |"

log "done; results follow on stdout"
cat <<EOF

### PostgreSQL backup to S3 vs pg_dump — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $GARAGE_VERSION (single node, 127.0.0.1, \`compression_level = "none"\`), ${AGENT_VERSION:-soma-agent (no --version)} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`$KNOBS bench/pg_backup.sh\`
- **Agent**: \`soma-agent ${AGENT_ARGS[*]}\` (release build; S3 via \`AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT\`, \`AWS_REGION=us-east-1\`)
- **PostgreSQL settings**: $(join_by ', ' "${PG_SETTINGS[@]}"); everything else default
- **Data**: \`pgbench -i -s $SCALE\` (${LOAD_S}s to load) → \`pg_database_size('$DB')\` = $DB_PRETTY ($DB_BYTES bytes)

| step | command | runs (s) | median (s) | MiB/s of raw dump | agent VmHWM |
|---|---|---|---|---|---|
$ROWS

- **Backup / pg_dump** (medians): **${RATIO}×** ($BACKUP_MED s vs $DUMP_MED s, $REPEAT alternating runs each)
- **Backup size** (manifest of \`$BACKUP_ID\`): raw_bytes $RAW_BYTES ($(mib "$RAW_BYTES") MiB), stored_bytes $STORED_BYTES ($(mib "$STORED_BYTES") MiB), $(ratio "$RAW_BYTES" "$STORED_BYTES")× smaller
- **Agent memory**: idle RSS $(mib "$((IDLE_RSS_KIB * 1024))") MiB; peak RSS per backup run $(for k in "${BACKUP_PEAKS_KIB[@]}"; do printf '%s ' "$(mib "$((k * 1024))")"; done)MiB; highest peak of the run $(mib "$((MAX_PEAK_KIB * 1024))") MiB ($PEAK_NOTE)
- **Restore check**: \`$RESTORED_DB\` ($RESTORED_PRETTY) vs \`$DB\`: $RESTORE_CHECK
EOF
