#!/usr/bin/env bash
# Soma Backup benchmark: the whole platform's restore time (RTO), split by phase (issue 11).
#
# Builds an "old platform" on 127.0.0.1: a throwaway PostgreSQL (a pgbench database plus two small
# databases owned by their own roles, one role a member of another), the Qdrant double with
# QDRANT_COLLECTIONS collections (QDRANT_MIB in all) and one release soma-agent serving both
# engines with --wal-stream, writing to a single-node Garage. Then:
#   logical:  `kubectl-soma backup all`; the old platform is killed; into an EMPTY new PostgreSQL
#             (fresh initdb) and an empty Qdrant double, through a new agent reading the old store
#             read-only (--restore-from):
#             (1) `kubectl-soma restore SET` — the whole platform, wall time, with each member's
#                 seconds from its JSON and a timeline of the phases from its progress lines;
#             (2) the same set again into another empty PostgreSQL and Qdrant, member by member:
#                 `restore PG_MEMBER --database DB` per database, `restore Q_MEMBER --collection C`
#                 per collection, each timed;
#   physical: `kubectl-soma backup all --physical`, `pgbench -T LOAD_SECONDS`, the target time,
#             more writes after it, the WAL archive caught up with the server; then
#             `soma-agent restore-pgdata --backup latest --target-time T` (timed), PostgreSQL
#             started on it until promoted (WAL replay, timed, with the WAL bytes replayed), and
#             `kubectl-soma restore SET --target-time T` for Qdrant (timed).
# Every restore is checked: databases, owners, roles, memberships, every table's row count (and
# the pgbench balances), every collection's points and vector parameters.
# Progress goes to stderr, a Markdown results block to stdout. KEEP_TMP=1 keeps the directory.
#
# Why one agent per platform serving both engines: `kubectl soma` spans several agents only
# through the Kubernetes API (pod discovery); a benchmark talks to an agent with --agent, i.e. to
# one. An agent serving both engines writes the same set (one member per engine) and `restore SET`
# restores member by member through the agent serving each, PostgreSQL first, as it does across
# pods, so the restore path measured is the same.
#
# Environment knobs:
#   SCALE=20                  pgbench scale factor of the big database (20 ≈ 300 MB)
#   SMALL_ROWS=50000          rows of the two small databases (appdb: 1x + 2x, metricsdb: 4x)
#   QDRANT_MIB=200            total size of the Qdrant collections (incompressible)
#   QDRANT_COLLECTIONS=3      how many collections share it
#   LOAD_SECONDS=30           pgbench -T after the physical set, before the target time
#   LOAD_CLIENTS=4            its clients
#   WAL_PARTIAL_INTERVAL=5s   soma-agent --wal-partial-interval
#   RECOVERY_TIMEOUT=3600     seconds allowed for WAL replay
#   plus BENCH_TMPDIR, PG_BIN, GARAGE_BIN, SOMA_SKIP_BUILD, SOMA_BIN_DIR, QDRANT_DOUBLE_BIN,
#   PART_SIZE, PARTS_IN_FLIGHT, COMPRESSION_LEVEL, COMPRESSION_THREADS, KEEP_TMP as for
#   bench/pg_backup.sh and bench/qdrant_snapshot.sh
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-20}
SMALL_ROWS=${SMALL_ROWS:-50000}
QDRANT_MIB=${QDRANT_MIB:-200}
QDRANT_COLLECTIONS=${QDRANT_COLLECTIONS:-3}
LOAD_SECONDS=${LOAD_SECONDS:-30}
LOAD_CLIENTS=${LOAD_CLIENTS:-4}
WAL_PARTIAL_INTERVAL=${WAL_PARTIAL_INTERVAL:-5s}
RECOVERY_TIMEOUT=${RECOVERY_TIMEOUT:-3600}
PG_RTO_TARGET_S=3600     # PostgreSQL RTO target: 1 h
QDRANT_RTO_TARGET_S=7200 # Qdrant RTO target: 2 h
BUCKET=soma-bench
OLD_PREFIX=old-platform # the store that survives the disaster; new agents only read it
PG_SETTINGS=(
  "shared_buffers = 512MB"
  "max_wal_size = 8GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
  "wal_level = replica"
)
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

for v in SCALE SMALL_ROWS QDRANT_MIB QDRANT_COLLECTIONS LOAD_SECONDS LOAD_CLIENTS RECOVERY_TIMEOUT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done
((QDRANT_MIB >= QDRANT_COLLECTIONS)) || { echo "QDRANT_MIB must be at least QDRANT_COLLECTIONS" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

QDRANT_PID=''
STDIN_HOLDER_PID=''
as_postgres() { "$@"; } # redefined when running as root
pgu() { (cd / && as_postgres "$@"); }
# shellcheck disable=SC2317 # called from the EXIT trap
pg_stop() { [[ ! -f "$1/postmaster.pid" ]] || pgu "$PG_BIN/pg_ctl" -D "$1" -m "${2:-fast}" -w -t 300 stop >/dev/null 2>&1 || true; }
FAILURE_LOGS=(agent.log garage.log pg/old.log pg/new-logical.log pg/new-split.log pg/pitr.log qdrant-old.log restore-pgdata.log)
install_cleanup

# ---------------------------------------------------------------------------------------------
# Helpers

psqlp() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$1" -U postgres -d "$2" "${@:3}"; } # PORT DB ARGS
sql() { psqlp "$OLD_PORT" "$@"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; } # FROM TO
add() { awk -v a="$1" -v b="$2" -v c="${3:-0}" 'BEGIN { printf "%.2f", a + b + c }'; }
max2() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (a > b ? a : b) }'; }
verdict() { awk -v s="$1" -v t="$2" 'BEGIN { if (s <= t) printf "within the %d h target (%.1f%% of it)", t / 3600, 100 * s / t; else printf "**OVER the %d h target**", t / 3600 }'; }

# new_cluster NAME: initdb (as the postgres user when root) into $PGO/NAME with the run's
# settings, started on a free port; sets C_DIR and C_PORT.
new_cluster() {
  C_DIR="$PGO/$1"
  C_PORT=$(free_port) || die "no free port"
  pgu "$PG_BIN/initdb" -D "$C_DIR" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$TMP_DIR/initdb-$1.log" 2>&1 ||
    { cat "$TMP_DIR/initdb-$1.log" >&2; die "initdb $1 failed"; }
  {
    printf "\n# soma benchmark\nlisten_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n" "$C_PORT" "$PGO"
    printf '%s\n' "${PG_SETTINGS[@]}"
  } >>"$C_DIR/postgresql.conf"
  pgu "$PG_BIN/pg_ctl" -D "$C_DIR" -l "$C_DIR.log" -w -t 120 start >/dev/null ||
    { tail -n 20 "$C_DIR.log" >&2; die "PostgreSQL $1 did not start"; }
  at_exit pg_stop "$C_DIR" immediate
}
drop_cluster() { pg_stop "$1" immediate && rm -rf "$1"; }

# pg_fingerprint PORT: what a user checks after a restore, one line each: databases and owners,
# roles, memberships, every table's row count, the pgbench balances.
pg_fingerprint() {
  local port=$1 db
  psqlp "$port" postgres -c "SELECT 'database ' || datname || ' owner ' || pg_get_userbyid(datdba) FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
  psqlp "$port" postgres -c "SELECT 'role ' || rolname || ' login ' || rolcanlogin FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1"
  psqlp "$port" postgres -c "SELECT 'member ' || pg_get_userbyid(member) || ' of ' || pg_get_userbyid(roleid) FROM pg_auth_members WHERE pg_get_userbyid(roleid) !~ '^pg_' ORDER BY 1"
  while read -r db; do
    psqlp "$port" "$db" -c "SELECT current_database() || ' ' || n.nspname || '.' || c.relname || ' owner ' || pg_get_userbyid(c.relowner) || ' rows ' ||
        (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
      ORDER BY 1"
    [[ "$db" != bench ]] || psqlp "$port" bench -c "SELECT 'bench balances ' || sum(abalance) || ' ' || sum(bbalance) FROM pgbench_accounts, (SELECT sum(bbalance) AS bbalance FROM pgbench_branches) b"
  done < <(psqlp "$port" postgres -c "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")
}

# qdrant_fingerprint URL: every collection with its points count and vector parameters.
qdrant_fingerprint() {
  local url=$1 c
  while read -r c; do
    [[ "$c" =~ ^[A-Za-z0-9_-]+$ ]] || die "unexpected collection name from $url: $c"
    curl -sS --fail "$url/collections/$c" | jq -r --arg c "$c" '"\($c) points \(.result.points_count) vectors \(.result.config.params.vectors | tojson)"'
  done < <(curl -sS --fail "$url/collections" | jq -r '.result.collections[].name' | sort)
}

# same WHAT EXPECTED_FILE GOT_FILE: "identical" or what differs (diff lines, at most 10).
same() {
  if cmp -s "$2" "$3"; then
    printf 'identical (%s lines: %s)' "$(wc -l <"$2")" "$1"
  else
    printf 'DIFFERENT (%s): %s' "$1" "$(diff "$2" "$3" | grep '^[<>]' | head -n 10 | tr '\n' ';')"
  fi
}

# stamped OUT ERR COMMAND...: stdout to OUT; each stderr line (the plugin's progress) to ERR
# prefixed with the epoch time it arrived ($EPOCHREALTIME: no process per line).
stamped() {
  local out=$1 err=$2 line
  shift 2
  "$@" 2>&1 >"$out" | while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$err"
}

# kubectl-soma with stdout in $TMP_DIR/OUT and stderr in $TMP_DIR/OUT.err; dies with the error.
soma_to() {
  local out=$1
  shift
  soma "$@" >"$TMP_DIR/$out" 2>"$TMP_DIR/$out.err" || { tail -n 20 "$TMP_DIR/$out.err" >&2; die "kubectl-soma $* failed"; }
}

# lsn_num LSN: an LSN (hex/hex) as a number, after checking its form.
lsn_num() {
  [[ "$1" =~ ^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$ ]] || return 1
  printf '%s\n' "$(((16#${BASH_REMATCH[1]} << 32) + 16#${BASH_REMATCH[2]}))"
}

# wait_archived LSN: until the agent's WAL archive (status -o json: wal_archive.archived_lsn)
# reaches LSN; sets ARCHIVE_WAIT_S.
wait_archived() {
  local want got n t0=$EPOCHREALTIME deadline=$((SECONDS + 600))
  want=$(lsn_num "$1") || die "not an LSN: $1"
  while :; do
    got=$(soma -o json status 2>/dev/null | jq -r '[.. | objects | .archived_lsn? | strings] | first // empty' || true)
    if [[ -n "$got" ]] && n=$(lsn_num "$got") && ((n >= want)); then break; fi
    ((SECONDS < deadline)) || die "the WAL archive did not reach $1 within 600 s (archived: ${got:-nothing})"
    kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited while waiting for the WAL archive"
    sleep 0.2
  done
  ARCHIVE_WAIT_S=$(secs "$t0" "$EPOCHREALTIME")
  log "WAL archive at $got (server $1), waited ${ARCHIVE_WAIT_S}s"
}

# wait_promoted PORT DIR: until PostgreSQL on PORT answers pg_is_in_recovery() = false.
wait_promoted() {
  local port=$1 dir=$2 deadline=$((SECONDS + RECOVERY_TIMEOUT))
  until [[ "$(psqlp "$port" postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; do
    pgu "$PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1 || { tail -n 20 "$dir.log" >&2; die "PostgreSQL on $dir stopped during recovery"; }
    ((SECONDS < deadline)) || die "PostgreSQL on $dir not promoted within $RECOVERY_TIMEOUT s"
    sleep 0.1
  done
}

# stop_agent NAME: stops the current agent and keeps its log as agent-NAME.log.
stop_agent() {
  stop_pid "$AGENT_PID"
  mv "$TMP_DIR/agent.log" "$TMP_DIR/agent-$1.log"
}

# new_agent NAME ARGS...: an agent of a new platform: its own store prefix, the old store as a
# read-only restore source.
new_agent() {
  local name=$1
  shift
  PREFIX=$name
  start_agent "$@" --restore-from "s3://$BUCKET/$OLD_PREFIX"
}

# timeline ERR: the phases of a stamped restore, one line each with its offset from START: the
# first progress line of every operation/phase/message (phase changes are printed at once,
# message changes within a phase at the next 2 s progress line).
timeline() {
  awk -v t0="$2" -F ' — ' '
    { split($1, a, " "); t = a[1]; sub(/^[^ ]+ /, "", $1); key = $1 (NF >= 3 ? " — " $NF : "") }
    !(key in seen) && $1 ~ /^restore / { seen[key] = 1; printf "  - +%.1f s: %s\n", t - t0, key }' "$1"
}

# ---------------------------------------------------------------------------------------------
log "Soma platform RTO benchmark: SCALE=$SCALE QDRANT_MIB=$QDRANT_MIB QDRANT_COLLECTIONS=$QDRANT_COLLECTIONS LOAD_SECONDS=$LOAD_SECONDS"
PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pgbench; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
find_garage
command -v jq >/dev/null 2>&1 || die "jq is needed (apt-get install jq)"
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH" # the agents' pg_dump / pg_restore / pg_basebackup match the server
find_qdrant_double          # builds the agent, the plugin and the double (unless SOMA_SKIP_BUILD)
pgu test -x "$BIN_DIR/soma-agent" || die "the postgres user cannot run $BIN_DIR/soma-agent (restore_command runs it)"
make_tmp_dir "$(((SCALE * 200 + 6 * QDRANT_MIB + 1024) * 1024))"
PGO="$TMP_DIR/pg" # everything the postgres user writes
mkdir -m 700 "$PGO"
[[ $(id -u) -ne 0 ]] || chown postgres: "$PGO"

start_garage
OLD_STORE="s3://$BUCKET/$OLD_PREFIX"
# with_aws COMMAND...: the command with Garage's credentials in its environment (never in an
# argument list, where ps would show them; runuser passes the environment on).
with_aws() (
  export AWS_ACCESS_KEY_ID="$AWS_KEY" AWS_SECRET_ACCESS_KEY="$AWS_SECRET" AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  "$@"
)

# --- the old platform ----------------------------------------------------------------------------
new_cluster old
OLD_DIR=$C_DIR OLD_PORT=$C_PORT
PG_SERVER_VERSION=$(sql postgres -c "SHOW server_version")
log "old PostgreSQL $PG_SERVER_VERSION on 127.0.0.1:$OLD_PORT"
sql postgres <<'SQL'
CREATE ROLE app_owner LOGIN;
CREATE ROLE app_reader NOLOGIN;
GRANT app_reader TO app_owner;
CREATE ROLE metrics_writer LOGIN;
CREATE DATABASE appdb OWNER app_owner;
CREATE DATABASE metricsdb OWNER metrics_writer;
CREATE DATABASE bench;
SQL
sql appdb -v rows="$SMALL_ROWS" <<'SQL'
SET ROLE app_owner;
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, created timestamptz NOT NULL);
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com', now() - g * interval '1 minute'
  FROM generate_series(1, :rows) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers, amount numeric(12, 2) NOT NULL, note text);
INSERT INTO orders (customer_id, amount, note) SELECT 1 + g % :rows, (g % 1000) / 10.0, md5(g::text)
  FROM generate_series(1, 2 * :rows) g;
CREATE INDEX orders_customer ON orders (customer_id);
GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_reader;
SQL
sql metricsdb -v rows="$SMALL_ROWS" <<'SQL'
SET ROLE metrics_writer;
CREATE TABLE samples (ts timestamptz NOT NULL, host text NOT NULL, value double precision NOT NULL);
INSERT INTO samples SELECT now() - g * interval '1 second', 'host-' || (g % 50), (g % 997) / 7.0
  FROM generate_series(1, 4 * :rows) g;
CREATE INDEX samples_ts ON samples (ts);
SQL
LOAD_S=''
log "loading: pgbench -i -s $SCALE bench"
timed LOAD_S "$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$OLD_PORT" -U postgres bench \
  >"$TMP_DIR/pgbench-init.log" 2>&1 || { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
sql postgres -c CHECKPOINT
DB_SIZES=$(sql postgres -c "SELECT string_agg(datname || ' ' || pg_size_pretty(pg_database_size(datname)), ', ' ORDER BY datname) FROM pg_database WHERE datallowconn AND NOT datistemplate")
CLUSTER_BYTES=$(sql postgres -c "SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datallowconn AND NOT datistemplate")
log "databases: $DB_SIZES (pgbench loaded in ${LOAD_S}s)"

COLLECTIONS=() SPECS=()
for i in $(seq 1 "$QDRANT_COLLECTIONS"); do
  COLLECTIONS+=("coll_$i") SPECS+=("coll_$i:$((QDRANT_MIB / QDRANT_COLLECTIONS))")
done
start_qdrant_double_named qdrant-old "${SPECS[@]}"
OLD_QDRANT_URL=$QDRANT_URL
QDRANT_VERSION=$(curl -sS --fail "$QDRANT_URL/" | jq -r .version)
log "old Qdrant double ($QDRANT_VERSION) on $QDRANT_URL: ${SPECS[*]} (MiB)"

mkdir "$TMP_DIR/wal-spool"
PREFIX=$OLD_PREFIX
start_agent --postgres-url "postgresql://postgres@127.0.0.1:$OLD_PORT/postgres" --qdrant-url "$OLD_QDRANT_URL" \
  --wal-stream --wal-spool "$TMP_DIR/wal-spool" --wal-partial-interval "$WAL_PARTIAL_INTERVAL"
OLD_AGENT_ARGS=("${AGENT_ARGS[@]}")

# --- backups ---------------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
t=''
timed t soma_to set-logical.json -o json backup all
BACKUP_L_S=$t
SET_L=$(json_field "$TMP_DIR/set-logical.json" id) || die "no id in the set manifest: $(head -c 600 "$TMP_DIR/set-logical.json")"
SET_L_RAW=$(json_field "$TMP_DIR/set-logical.json" raw_bytes) SET_L_STORED=$(json_field "$TMP_DIR/set-logical.json" stored_bytes)
PG_MEMBER='' Q_MEMBER='' PG_MEMBER_KIND=''
while read -r m; do
  soma_to "member-$m.json" -o json describe "$m"
  case "$(json_field "$TMP_DIR/member-$m.json" engine)" in
  postgres) PG_MEMBER=$m PG_MEMBER_KIND=$(json_field "$TMP_DIR/member-$m.json" kind) ;;
  qdrant) Q_MEMBER=$m ;;
  esac
done < <(jq -r '.members[]' "$TMP_DIR/set-logical.json")
[[ -n "$PG_MEMBER" && -n "$Q_MEMBER" ]] || die "set $SET_L lacks a PostgreSQL or a Qdrant member: $(jq -c .members "$TMP_DIR/set-logical.json")"
log "logical set $SET_L in ${BACKUP_L_S}s: $PG_MEMBER ($PG_MEMBER_KIND), $Q_MEMBER; raw $SET_L_RAW, stored $SET_L_STORED bytes"
[[ "$PG_MEMBER_KIND" == logical-cluster ]] || log "WARNING: the PostgreSQL member is $PG_MEMBER_KIND, not logical-cluster (globals + every database)"
# The databases of the member, as its manifest lists them (the old server's list otherwise).
mapfile -t DATABASES < <(jq -r '.details.databases[]?.name // empty' "$TMP_DIR/member-$PG_MEMBER.json")
((${#DATABASES[@]} > 0)) || mapfile -t DATABASES < <(sql postgres -c "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")
pg_fingerprint "$OLD_PORT" >"$TMP_DIR/expected-logical.txt"
qdrant_fingerprint "$OLD_QDRANT_URL" >"$TMP_DIR/expected-qdrant.txt"

timed t soma_to set-physical.json -o json backup all --physical
BACKUP_P_S=$t
SET_P=$(json_field "$TMP_DIR/set-physical.json" id) || die "no id in the set manifest: $(head -c 600 "$TMP_DIR/set-physical.json")"
log "physical set $SET_P in ${BACKUP_P_S}s"

log "load after the physical set: pgbench -c $LOAD_CLIENTS -T $LOAD_SECONDS bench"
LSN_BEFORE_LOAD=$(sql postgres -c "SELECT pg_current_wal_insert_lsn()")
"$PG_BIN/pgbench" -n -c "$LOAD_CLIENTS" -j 2 -T "$LOAD_SECONDS" -h 127.0.0.1 -p "$OLD_PORT" -U postgres bench \
  >"$TMP_DIR/pgbench-load.log" 2>&1 || { tail -n 20 "$TMP_DIR/pgbench-load.log" >&2; die "pgbench load failed"; }
LOAD_TPS=$(sed -n 's/^tps = \([0-9]*\).*/\1/p' "$TMP_DIR/pgbench-load.log" | head -n 1)
pg_fingerprint "$OLD_PORT" >"$TMP_DIR/expected-pitr.txt"
TARGET_TIME=$(sql postgres -c "SELECT now()") # as psql prints it, the form users copy
TARGET_LSN=$(sql postgres -c "SELECT pg_current_wal_insert_lsn()")
LOAD_WAL_BYTES=$(sql postgres -c "SELECT pg_wal_lsn_diff('$TARGET_LSN', '$LSN_BEFORE_LOAD')")
log "target time $TARGET_TIME (LSN $TARGET_LSN, $(mib "$LOAD_WAL_BYTES") MiB of WAL since the set, $LOAD_TPS tps)"
# After the target: must not come back (and gives recovery a commit past the target to stop at).
"$PG_BIN/pgbench" -n -c 2 -j 2 -T 3 -h 127.0.0.1 -p "$OLD_PORT" -U postgres bench >"$TMP_DIR/pgbench-after.log" 2>&1 ||
  { tail -n 20 "$TMP_DIR/pgbench-after.log" >&2; die "pgbench after the target failed"; }
ARCHIVE_WAIT_S=''
wait_archived "$(sql postgres -c "SELECT pg_current_wal_insert_lsn()")"

# --- the disaster: only the bucket survives --------------------------------------------------------
kill -KILL "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
mv "$TMP_DIR/agent.log" "$TMP_DIR/agent-old.log"
stop_double
drop_cluster "$OLD_DIR"
log "old platform gone: agent killed, Qdrant and PostgreSQL stopped and deleted"

# --- (1) logical: the whole set, one command -------------------------------------------------------
new_cluster new-logical
NEW_L_DIR=$C_DIR NEW_L_PORT=$C_PORT
start_qdrant_double_named qdrant-new-logical
new_agent new-logical --postgres-url "postgresql://postgres@127.0.0.1:$NEW_L_PORT/postgres" --qdrant-url "$QDRANT_URL"
NEW_AGENT_ARGS=("${AGENT_ARGS[@]}")
sync
T0=$EPOCHREALTIME
stamped "$TMP_DIR/restore-set.json" "$TMP_DIR/restore-set.progress" soma -o json restore "$SET_L" ||
  { tail -n 20 "$TMP_DIR/restore-set.progress" >&2; die "kubectl-soma restore $SET_L failed"; }
RESTORE_L_S=$(secs "$T0" "$EPOCHREALTIME")
RESTORE_L_REPORTED=$(jq -r '.seconds * 100 | round / 100' "$TMP_DIR/restore-set.json")
MEMBER_ROWS=$(jq -r '.restored[] | "| \(.engine) | `\(.backup_id)` | \(.raw_bytes) (\(.raw_bytes / 1048576 * 10 | floor / 10) MiB) | \(.seconds * 100 | round / 100) | \(.summary | gsub("\\|"; "/")) |"' "$TMP_DIR/restore-set.json")
PG_MEMBER_S=$(jq -r '[.restored[] | select(.engine == "postgres") | .seconds] | add // 0 | . * 100 | round / 100' "$TMP_DIR/restore-set.json")
Q_MEMBER_S=$(jq -r '[.restored[] | select(.engine == "qdrant") | .seconds] | add // 0 | . * 100 | round / 100' "$TMP_DIR/restore-set.json")
TIMELINE=$(timeline "$TMP_DIR/restore-set.progress" "$T0")
log "restore $SET_L: ${RESTORE_L_S}s (PostgreSQL member ${PG_MEMBER_S}s, Qdrant member ${Q_MEMBER_S}s)"
pg_fingerprint "$NEW_L_PORT" >"$TMP_DIR/got-logical.txt"
qdrant_fingerprint "$QDRANT_URL" >"$TMP_DIR/got-logical-qdrant.txt"
CHECK_L_PG=$(same "PostgreSQL" "$TMP_DIR/expected-logical.txt" "$TMP_DIR/got-logical.txt")
CHECK_L_Q=$(same "Qdrant" "$TMP_DIR/expected-qdrant.txt" "$TMP_DIR/got-logical-qdrant.txt")
log "check: $CHECK_L_PG; $CHECK_L_Q"
stop_agent new-logical
stop_double
drop_cluster "$NEW_L_DIR"

# --- (2) logical, member by member: each database, each collection -----------------------------------
new_cluster new-split
NEW_S_DIR=$C_DIR NEW_S_PORT=$C_PORT
start_qdrant_double_named qdrant-new-split
new_agent new-split --postgres-url "postgresql://postgres@127.0.0.1:$NEW_S_PORT/postgres" --qdrant-url "$QDRANT_URL"
SPLIT_ROWS='' SPLIT_PG_S=0 SPLIT_Q_S=0
for db in "${DATABASES[@]}"; do
  sync
  timed t soma_to "restore-db-$db.json" -o json restore "$PG_MEMBER" --database "$db"
  SPLIT_PG_S=$(add "$SPLIT_PG_S" "$t")
  SPLIT_ROWS+="| PostgreSQL database \`$db\` (with the roles it needs) | \`kubectl-soma restore $PG_MEMBER --database $db\` | $t |
"
  log "restore --database $db: ${t}s"
done
for c in "${COLLECTIONS[@]}"; do
  sync
  timed t soma_to "restore-coll-$c.json" -o json restore "$Q_MEMBER" --collection "$c"
  SPLIT_Q_S=$(add "$SPLIT_Q_S" "$t")
  SPLIT_ROWS+="| Qdrant collection \`$c\` ($((QDRANT_MIB / QDRANT_COLLECTIONS)) MiB) | \`kubectl-soma restore $Q_MEMBER --collection $c\` | $t |
"
  log "restore --collection $c: ${t}s"
done
pg_fingerprint "$NEW_S_PORT" >"$TMP_DIR/got-split.txt"
qdrant_fingerprint "$QDRANT_URL" >"$TMP_DIR/got-split-qdrant.txt"
CHECK_S_PG=$(same "PostgreSQL" "$TMP_DIR/expected-logical.txt" "$TMP_DIR/got-split.txt")
CHECK_S_Q=$(same "Qdrant" "$TMP_DIR/expected-qdrant.txt" "$TMP_DIR/got-split-qdrant.txt")
log "check: $CHECK_S_PG; $CHECK_S_Q"
stop_agent new-split
stop_double
drop_cluster "$NEW_S_DIR"

# --- (3) physical: base backup + WAL to the target time, Qdrant as of it --------------------------------
R_DIR="$PGO/pitr" R_PORT=$(free_port) || die "no free port"
pgu mkdir -m 700 "$R_DIR"
sync
timed t with_aws pgu "$BIN_DIR/soma-agent" restore-pgdata --store "$OLD_STORE" --backup latest \
  --target-time "$TARGET_TIME" --pgdata "$R_DIR" >"$TMP_DIR/restore-pgdata.log" 2>&1 ||
  { tail -n 20 "$TMP_DIR/restore-pgdata.log" >&2; die "soma-agent restore-pgdata failed"; }
PGDATA_S=$t
START_LSN=$(sed -n 's/^START WAL LOCATION: \([0-9A-Fa-f]*\/[0-9A-Fa-f]*\) .*/\1/p' "$R_DIR/backup_label" 2>/dev/null | head -n 1)
lsn_num "$START_LSN" >/dev/null || die "no START WAL LOCATION in the restored backup_label"
RESTORED_BYTES=$(du -sb "$R_DIR" | cut -f 1)
log "restore-pgdata: ${PGDATA_S}s, $(mib "$RESTORED_BYTES") MiB laid down, base backup starts at $START_LSN"
at_exit pg_stop "$R_DIR" immediate
T1=$EPOCHREALTIME
with_aws pgu env PATH="$BIN_DIR:$PG_BIN:$PATH" "$PG_BIN/pg_ctl" -D "$R_DIR" -l "$R_DIR.log" -w -t "$RECOVERY_TIMEOUT" \
  -o "-p $R_PORT -c unix_socket_directories=$PGO" start >/dev/null ||
  { tail -n 20 "$R_DIR.log" >&2; die "PostgreSQL did not start on $R_DIR"; }
wait_promoted "$R_PORT" "$R_DIR"
REPLAY_S=$(secs "$T1" "$EPOCHREALTIME")
REPLAYED_LSN=$(psqlp "$R_PORT" postgres -c "SELECT pg_last_wal_replay_lsn()")
REPLAYED_BYTES=$(psqlp "$R_PORT" postgres -c "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '$START_LSN')")
log "WAL replay: started → promoted in ${REPLAY_S}s, $(mib "$REPLAYED_BYTES") MiB of WAL ($START_LSN → $REPLAYED_LSN)"
pg_fingerprint "$R_PORT" >"$TMP_DIR/got-pitr.txt"
CHECK_P_PG=$(same "PostgreSQL at the target time" "$TMP_DIR/expected-pitr.txt" "$TMP_DIR/got-pitr.txt")

start_qdrant_double_named qdrant-new-pitr
new_agent new-pitr --qdrant-url "$QDRANT_URL"
sync
timed t soma_to restore-pitr-set.json -o json restore "$SET_P" --target-time "$TARGET_TIME"
QPITR_S=$t
QPITR_CHOSEN=$(jq -r '[.restored[] | select(.engine == "qdrant") | .backup_id] | join(", ")' "$TMP_DIR/restore-pitr-set.json")
QPITR_PENDING=$(jq -r '[.pending[]? | "\(.backup_id) (\(.kind // .engine))"] | join(", ")' "$TMP_DIR/restore-pitr-set.json")
qdrant_fingerprint "$QDRANT_URL" >"$TMP_DIR/got-pitr-qdrant.txt"
CHECK_P_Q=$(same "Qdrant" "$TMP_DIR/expected-qdrant.txt" "$TMP_DIR/got-pitr-qdrant.txt")
log "Qdrant restore of $SET_P to $TARGET_TIME: ${QPITR_S}s ($QPITR_CHOSEN); check: $CHECK_P_PG; $CHECK_P_Q"
stop_agent new-pitr
stop_double
drop_cluster "$R_DIR"
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)

# --- results -------------------------------------------------------------------------------------
collect_run_info
PG_PITR_S=$(add "$PGDATA_S" "$REPLAY_S")
PHYS_SEQ_S=$(add "$PG_PITR_S" "$QPITR_S")
PHYS_PAR_S=$(max2 "$PG_PITR_S" "$QPITR_S")
SPLIT_TOTAL_S=$(add "$SPLIT_PG_S" "$SPLIT_Q_S")
KNOBS="SCALE=$SCALE QDRANT_MIB=$QDRANT_MIB QDRANT_COLLECTIONS=$QDRANT_COLLECTIONS LOAD_SECONDS=$LOAD_SECONDS$(agent_knobs)"
[[ "$SMALL_ROWS" == 50000 ]] || KNOBS+=" SMALL_ROWS=$SMALL_ROWS"
log "done; results follow on stdout"
cat <<EOF

### Platform RTO by phase — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, Qdrant REST **test double** reporting $QDRANT_VERSION, $GARAGE_VERSION (single node, 127.0.0.1, \`compression_level = "none"\`), ${AGENT_VERSION:-soma-agent} at $GIT_REV (release build), $RUSTC_VERSION
- **Command**: \`$KNOBS bench/platform_rto.sh\`
- **Old platform**: PostgreSQL (settings: $(join_by ', ' "${PG_SETTINGS[@]}")): $DB_SIZES, $(mib "$CLUSTER_BYTES") MiB in all; \`pgbench -i -s $SCALE\` in \`bench\`, roles \`app_owner\` (login, member of \`app_reader\`) owning \`appdb\` and \`metrics_writer\` owning \`metricsdb\`; Qdrant double with $QDRANT_COLLECTIONS collections of $((QDRANT_MIB / QDRANT_COLLECTIONS)) MiB of incompressible bytes ($(join_by ', ' "${COLLECTIONS[@]}")); one agent \`soma-agent ${OLD_AGENT_ARGS[*]}\` serving both engines
- **New platform** (each phase below on its own fresh \`initdb\` and empty Qdrant double): \`soma-agent ${NEW_AGENT_ARGS[*]}\` (new prefix, the old one read-only)
- **Backups**: \`kubectl-soma backup all\` $BACKUP_L_S s → \`$SET_L\` (members \`$PG_MEMBER\` $PG_MEMBER_KIND, \`$Q_MEMBER\`; raw $(mib "$SET_L_RAW") MiB, stored $(mib "$SET_L_STORED") MiB); \`kubectl-soma backup all --physical\` $BACKUP_P_S s → \`$SET_P\`
- **Checks** (databases with owners, roles, memberships, every table's row count, pgbench balances; each collection's points and vector parameters): whole set: $CHECK_L_PG, $CHECK_L_Q; member by member: $CHECK_S_PG, $CHECK_S_Q; point in time: $CHECK_P_PG, $CHECK_P_Q

**Logical set, one command** — \`kubectl-soma -o json restore $SET_L\` into the empty platform: **$RESTORE_L_S s** wall ($RESTORE_L_REPORTED s reported by the plugin)

| member | backup | raw bytes | seconds | summary |
|---|---|---|---|---|
$MEMBER_ROWS

Phases as the plugin's progress lines arrived (offsets from the command's start):
$TIMELINE

**Logical set, member by member** — another empty platform, one command per database and collection:

| phase | command | seconds |
|---|---|---|
${SPLIT_ROWS%$'\n'}
| **PostgreSQL, all databases** | | **$SPLIT_PG_S** |
| **Qdrant, all collections** | | **$SPLIT_Q_S** |
| **total** | | **$SPLIT_TOTAL_S** |

**Physical set to a point in time** — \`backup all --physical\`, then \`pgbench -n -c $LOAD_CLIENTS -T $LOAD_SECONDS\` ($LOAD_TPS tps, $(mib "$LOAD_WAL_BYTES") MiB of WAL), target time \`$TARGET_TIME\`, 3 s more writes after it, the WAL archive caught up in ${ARCHIVE_WAIT_S} s; then:

| phase | command | seconds |
|---|---|---|
| lay down the base backup | \`soma-agent restore-pgdata --store $OLD_STORE --backup latest --target-time '$TARGET_TIME' --pgdata DIR\` ($(mib "$RESTORED_BYTES") MiB laid down) | $PGDATA_S |
| WAL replay: start → promoted | \`pg_ctl start\`, until \`pg_is_in_recovery()\` is false: $(mib "$REPLAYED_BYTES") MiB of WAL replayed ($START_LSN → $REPLAYED_LSN) | $REPLAY_S |
| **PostgreSQL** | | **$PG_PITR_S** |
| Qdrant as of the target time | \`kubectl-soma restore $SET_P --target-time '$TARGET_TIME'\` (restored $QPITR_CHOSEN; left for restore-pgdata: $QPITR_PENDING) | $QPITR_S |
| **total, one after the other** | | **$PHYS_SEQ_S** |
| total, Qdrant restored while PostgreSQL replays (independent) | | $PHYS_PAR_S |

**RTO against the targets** (PostgreSQL ≤ 1 h, Qdrant ≤ 2 h):
- PostgreSQL, logical (whole-set member): $PG_MEMBER_S s, $(verdict "$PG_MEMBER_S" "$PG_RTO_TARGET_S"); physical to a point in time: $PG_PITR_S s, $(verdict "$PG_PITR_S" "$PG_RTO_TARGET_S")
- Qdrant, logical set member: $Q_MEMBER_S s, $(verdict "$Q_MEMBER_S" "$QDRANT_RTO_TARGET_S"); to a point in time: $QPITR_S s, $(verdict "$QPITR_S" "$QDRANT_RTO_TARGET_S")
- Whole platform: logical $RESTORE_L_S s, physical $PHYS_SEQ_S s (one after the other)
EOF
ALL_CHECKS="$CHECK_L_PG $CHECK_L_Q $CHECK_S_PG $CHECK_S_Q $CHECK_P_PG $CHECK_P_Q"
[[ "$ALL_CHECKS" != *DIFFERENT* ]] || die "a restored platform differs from the old one (see Checks above)"
