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
# and then the same for a base backup of the cluster (the agent streams WAL; pgbench writes after
# the backup, so both replay it):
#   (e) kubectl-soma backup postgres --physical               pg_basebackup → S3
#   (f) soma-agent restore-pgdata + pg_ctl start → promoted   the plain physical restore to latest
#   (g) kubectl-soma drill <physical id>                      scratch data directory, scratch server
#                                                             replaying to the end of the archive,
#                                                             pg_amcheck, counts, cleanup
# Each of (c)/(d) and (f)/(g) runs REPEAT times, alternating; medians are reported.
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

FAILURE_LOGS=(agent.log garage.log pg/postgres.log)
install_cleanup

log "Soma Backup drill benchmark: SCALE=$SCALE REPEAT=$REPEAT"
find_pg_tools
find_garage
build_soma
make_tmp_dir "$((SCALE * 100 * 1024 * 3))"

# --- PostgreSQL --------------------------------------------------------------------------------
start_postgres
load_pgbench "$DB"
db_size "$DB"

start_garage
mkdir -m 700 "$TMP_DIR/drill" "$TMP_DIR/spool"
[[ $(id -u) -ne 0 ]] || chown postgres: "$TMP_DIR/drill"
start_agent --postgres-url "postgresql://postgres@127.0.0.1:$PG_PORT/$DB" \
  --wal-stream --wal-spool "$TMP_DIR/spool" --wal-partial-interval 1s --drill-dir "$TMP_DIR/drill"

# --- measurements ------------------------------------------------------------------------------
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

# --- the same for a base backup ----------------------------------------------------------------
PHYS_S=''
timed PHYS_S soma -o json backup postgres --physical >"$TMP_DIR/physical.json" 2>"$TMP_DIR/physical.err" ||
  { cat "$TMP_DIR/physical.err" >&2; die "kubectl-soma backup --physical failed"; }
PHYS_ID=$(json_field "$TMP_DIR/physical.json" id)
log "(e) base backup $PHYS_ID: ${PHYS_S}s"
# WAL after the backup, which both restores replay; then wait until the archive holds all of it.
"$PG_BIN/pgbench" -n -c 2 -t "$((SCALE * 500))" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" \
  >"$TMP_DIR/pgbench-run.log" 2>&1 || { cat "$TMP_DIR/pgbench-run.log" >&2; die "pgbench failed"; }
WAL_TARGET=$(sql postgres -c "SELECT pg_current_wal_insert_lsn()")
WAL_AFTER=$(sql postgres -c "SELECT pg_size_pretty(pg_wal_lsn_diff('$WAL_TARGET', '$(json_field "$TMP_DIR/physical.json" details.stop_lsn)'))")
deadline=$((SECONDS + 300))
until ARCHIVED=$(soma -o json status | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["wal_archive"].get("archived_lsn") or "0/0")') &&
  [[ "$(sql postgres -c "SELECT pg_wal_lsn_diff('$ARCHIVED', '$WAL_TARGET') >= 0")" == t ]]; do
  ((SECONDS < deadline)) || die "the WAL archive did not reach $WAL_TARGET (at $ARCHIVED)"
  sleep 0.5
done
log "$WAL_AFTER of WAL after the base backup archived (to $WAL_TARGET)"
R_BASE="$TMP_DIR/r-physical" # owned by the server's user: data directory, log and socket
R_DIR="$R_BASE/data"
# shellcheck disable=SC2317 # called from the EXIT trap
stop_restored() { [[ ! -f "$R_DIR/postmaster.pid" ]] || (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$R_DIR" -m immediate -w stop >/dev/null 2>&1) || true; }
at_exit stop_restored
plain_physical() {
  local port
  port=$(free_port) || die "no free port"
  rm -rf "$R_BASE" && mkdir -m 700 "$R_BASE" "$R_DIR"
  [[ $(id -u) -ne 0 ]] || chown postgres: "$R_BASE" "$R_DIR"
  (cd / && as_postgres env AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID="$AWS_KEY" \
    AWS_SECRET_ACCESS_KEY="$AWS_SECRET" AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    "$BIN_DIR/soma-agent" restore-pgdata --store "$STORE_URL" --pgdata "$R_DIR" --backup "$PHYS_ID" --target latest &&
    as_postgres env AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID="$AWS_KEY" \
      AWS_SECRET_ACCESS_KEY="$AWS_SECRET" AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
      "$PG_BIN/pg_ctl" -D "$R_DIR" -l "$R_BASE/server.log" -w -t 600 \
      -o "-p $port -c archive_mode=off -c listen_addresses=127.0.0.1 -c unix_socket_directories=$R_BASE" start) \
    >"$TMP_DIR/plain-physical.out" 2>&1 || { cat "$TMP_DIR/plain-physical.out" "$R_BASE/server.log" >&2; return 1; }
  # pg_ctl -w returns once connections are accepted; with hot_standby on that can be before the end
  # of recovery, so wait for promotion.
  until [[ "$("$PG_BIN/psql" -X -At -h 127.0.0.1 -p "$port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; do
    sleep 0.1
  done
}
PLAIN_TIMES=() PDRILL_TIMES=() PRTOS=()
for i in $(seq 1 "$REPEAT"); do
  settle
  timed t plain_physical || die "the plain physical restore failed"
  PLAIN_TIMES+=("$t")
  stop_restored
  log "run $i/$REPEAT (f) restore-pgdata + start + promoted: ${t}s"
  settle
  timed t soma -o json drill "$PHYS_ID" >"$TMP_DIR/pdrill-$i.json" 2>"$TMP_DIR/pdrill-$i.err" ||
    { cat "$TMP_DIR/pdrill-$i.err" >&2; die "kubectl-soma drill of the base backup failed"; }
  PDRILL_TIMES+=("$t")
  PRTOS+=("$(printf '%.2f' "$(json_field "$TMP_DIR/pdrill-$i.json" rto_seconds)")")
  [[ "$(json_field "$TMP_DIR/pdrill-$i.json" passed)" == true ]] || die "the physical drill did not pass: $(cat "$TMP_DIR/pdrill-$i.json")"
  log "run $i/$REPEAT (g) drill of the base backup: ${t}s, RTO ${PRTOS[-1]}s"
done
rm -rf "$R_BASE"
PLEFT=$(find "$TMP_DIR/drill" -mindepth 1 | wc -l)
PLAIN_MED=$(median "${PLAIN_TIMES[@]}")
PDRILL_MED=$(median "${PDRILL_TIMES[@]}")
PRTO_MED=$(median "${PRTOS[@]}")
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

Base backup of the same cluster ((e) ${PHYS_S}s), then \`pgbench -n -c 2 -t $((SCALE * 500))\`: $WAL_AFTER of WAL after it, which both replay:

| step | command | runs (s) | median (s) |
|---|---|---|---|
| (f) plain physical restore | \`soma-agent restore-pgdata --backup <id> --target latest\`, \`pg_ctl start\`, until promoted | $(join_by ', ' "${PLAIN_TIMES[@]}") | $PLAIN_MED |
| (g) drill | \`kubectl-soma drill <physical id>\` (scratch data directory + server, replay, pg_amcheck, counts, cleanup) | $(join_by ', ' "${PDRILL_TIMES[@]}") | $PDRILL_MED |
| (g) RTO reported by the drill | download start → promoted scratch server accepts connections | $(join_by ', ' "${PRTOS[@]}") | $PRTO_MED |

- **Physical drill / plain physical restore** (medians): **$(ratio "$PDRILL_MED" "$PLAIN_MED")×**; the drill's own RTO is $(ratio "$PRTO_MED" "$PLAIN_MED")× the plain restore
- **Left behind**: $PLEFT entries in the drill directory after $REPEAT physical drills
EOF
