#!/usr/bin/env bash
# Soma Backup benchmark: restore drill time next to the plain restore time, on the pgbench
# database, in one run.
#
# Starts a throwaway PostgreSQL and a single-node Garage S3 server on 127.0.0.1, loads a pgbench
# database (`pgbench -i -s $SCALE`, ~150 MB at the default scale 10), starts a release soma-agent
# against Garage and measures wall times of:
#   (a) kubectl-soma backup postgres --database bench         dump + validation data (row counts and
#                                                             checksums in pg_dump's snapshot) → S3
#   (b) the validation scan alone                             the same count-and-checksum query the
#                                                             backup runs beside pg_dump, run by psql
#   (c) kubectl-soma restore <id> --database bench_restored   the plain restore
#   (d) kubectl-soma drill <id>                               scratch restore + validation + cleanup,
#                                                             with the RTO the drill reports
# Each of (c) and (d) runs REPEAT times, alternating; medians are reported.
#
# Progress goes to stderr; a Markdown results block goes to stdout. Everything is removed on exit
# (KEEP_TMP=1 keeps the directory).
#
# Environment knobs:
#   SCALE=10                 pgbench scale factor (10 ≈ 150 MB, 100 ≈ 1.5 GB)
#   REPEAT=3                 (c)/(d) pairs
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
PART_SIZE=${PART_SIZE:-}
PARTS_IN_FLIGHT=${PARTS_IN_FLIGHT:-}
COMPRESSION_LEVEL=${COMPRESSION_LEVEL:-}
COMPRESSION_THREADS=${COMPRESSION_THREADS:-}
DB=bench
RESTORED_DB=bench_restored
BUCKET=soma-bench
PREFIX=drill
PG_SETTINGS=(
  "shared_buffers = 256MB"
  "max_wal_size = 4GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
)

unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || { echo "SCALE must be a positive integer" >&2; exit 2; }
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a positive integer" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

PG_DATA=''
as_postgres() { "$@"; } # redefined when running as root
# shellcheck disable=SC2317 # called from the EXIT trap
stop_postgres() { (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null 2>&1); }
FAILURE_LOGS=(agent.log garage.log pg/postgres.log)
install_cleanup

sql() {
  local db=$1
  shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

log "Soma Backup drill benchmark: SCALE=$SCALE REPEAT=$REPEAT"
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
make_tmp_dir "$((SCALE * 100 * 1024 * 3))"

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
sql "$DB" -c "CHECKPOINT"
DB_BYTES=$(sql "$DB" -c "SELECT pg_database_size('$DB')")
DB_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
log "database $DB: $DB_PRETTY"

start_garage
start_agent --postgres-url "postgresql://postgres@127.0.0.1:$PG_PORT/$DB"

# --- measurements ------------------------------------------------------------------------------
settle() { sql postgres -c "CHECKPOINT" && sync; }
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
BACKUP_S='' SCAN_S='' t=''
timed BACKUP_S soma -o json backup postgres --database "$DB" >"$TMP_DIR/backup.json" 2>"$TMP_DIR/backup.err" ||
  { cat "$TMP_DIR/backup.err" >&2; die "kubectl-soma backup failed"; }
BACKUP_ID=$(json_field "$TMP_DIR/backup.json" id)
RAW_BYTES=$(json_field "$TMP_DIR/backup.json" raw_bytes)
TABLES=$(python3 -c 'import json, sys
tables = json.load(open(sys.argv[1]))["details"]["databases"][0].get("tables") or []
print(", ".join("%s.%s %d rows" % (t["schema"], t["table"], t["rows"]) for t in tables))' "$TMP_DIR/backup.json")
log "(a) backup $BACKUP_ID: ${BACKUP_S}s; validation data: $TABLES"

# (b) The validation scan the backup runs beside pg_dump, alone (the same query as the agent's
# engine/postgres/validation.rs STATS_QUERY).
SCAN_SQL="select coalesce(json_agg(json_build_object('table', s.tbl, 'rows', (xpath('/row/n/text()', s.x))[1]::text::bigint)), '[]')
  from (select c.relname as tbl, query_to_xml(format('select count(*) as n, coalesce(sum(hashtextextended(t::text, 0)), 0) as h from only %I.%I t', n.nspname, c.relname), false, true, '') as x
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg_toast%') s"
timed SCAN_S sql "$DB" -c "$SCAN_SQL" >/dev/null
log "(b) validation scan alone: ${SCAN_S}s"

RESTORE_TIMES=() DRILL_TIMES=() RTOS=()
for i in $(seq 1 "$REPEAT"); do
  sql postgres -c "DROP DATABASE IF EXISTS $RESTORED_DB"
  settle
  timed t soma restore "$BACKUP_ID" --database "$RESTORED_DB" >"$TMP_DIR/restore-$i.out" 2>&1 ||
    { cat "$TMP_DIR/restore-$i.out" >&2; die "kubectl-soma restore failed"; }
  RESTORE_TIMES+=("$t")
  log "run $i/$REPEAT (c) restore: ${t}s"
  settle
  timed t soma -o json drill "$BACKUP_ID" >"$TMP_DIR/drill-$i.json" 2>"$TMP_DIR/drill-$i.err" ||
    { cat "$TMP_DIR/drill-$i.err" >&2; die "kubectl-soma drill failed"; }
  DRILL_TIMES+=("$t")
  RTOS+=("$(printf '%.2f' "$(json_field "$TMP_DIR/drill-$i.json" rto_seconds)")")
  [[ "$(json_field "$TMP_DIR/drill-$i.json" passed)" == true ]] || die "the drill did not pass: $(cat "$TMP_DIR/drill-$i.json")"
  log "run $i/$REPEAT (d) drill: ${t}s, RTO ${RTOS[-1]}s"
done
LEFT=$(sql postgres -c "select count(*) from pg_database where datname like 'soma_drill_%'")
[[ "$LEFT" == 0 ]] || die "the drills left $LEFT scratch database(s)"
CHECKS=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(len([c for c in r["checks"] if not c.get("skipped")]))' "$TMP_DIR/drill-$REPEAT.json")
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)

RESTORE_MED=$(median "${RESTORE_TIMES[@]}")
DRILL_MED=$(median "${DRILL_TIMES[@]}")
RTO_MED=$(median "${RTOS[@]}")
collect_run_info
log "done; results follow on stdout"
cat <<EOF

### Restore drill vs plain restore — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $GARAGE_VERSION (single node, 127.0.0.1), ${AGENT_VERSION:-soma-agent} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`SCALE=$SCALE REPEAT=$REPEAT$(agent_knobs) bench/drill.sh\` (binaries: $BIN_DIR)
- **Data**: \`pgbench -i -s $SCALE\` (${LOAD_S}s to load) → $DB_PRETTY ($DB_BYTES bytes), raw dump $(mib "$RAW_BYTES") MiB

| step | command | runs (s) | median (s) |
|---|---|---|---|
| (a) backup with validation data | \`kubectl-soma backup postgres --database $DB\` | $BACKUP_S | $BACKUP_S |
| (b) validation scan alone | count + checksum of every table (what (a) runs beside pg_dump) | $SCAN_S | $SCAN_S |
| (c) plain restore | \`kubectl-soma restore <id> --database $RESTORED_DB\` | $(join_by ', ' "${RESTORE_TIMES[@]}") | $RESTORE_MED |
| (d) drill | \`kubectl-soma drill <id>\` (scratch restore, $CHECKS checks, cleanup) | $(join_by ', ' "${DRILL_TIMES[@]}") | $DRILL_MED |
| (d) RTO reported by the drill | restore start → data usable | $(join_by ', ' "${RTOS[@]}") | $RTO_MED |

- **Drill / plain restore** (medians): **$(ratio "$DRILL_MED" "$RESTORE_MED")×**; the drill's own RTO is $(ratio "$RTO_MED" "$RESTORE_MED")× the plain restore
- **Validation overhead at backup time**: the scan runs concurrently with pg_dump in the same snapshot; alone it takes $SCAN_S s, $(ratio "$SCAN_S" "$BACKUP_S")× the backup's wall time, which bounds what it adds
- **Left behind**: $LEFT scratch databases after $REPEAT drills
EOF
