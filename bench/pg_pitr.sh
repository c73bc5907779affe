#!/usr/bin/env bash
# Soma Backup benchmark: physical PostgreSQL backup, restore and RPO, side by side with pgBackRest.
#
# Starts, all on 127.0.0.1, a throwaway PostgreSQL (wal_level=replica, archive_command =
# pgBackRest archive-push), a single-node Garage S3 server with stunnel (TLS, self-signed) in front
# of it for pgBackRest, and a release soma-agent streaming WAL (--wal-stream) to the same bucket,
# loads `pgbench -i -s $SCALE` and measures:
#   (1) full backup: `pgbackrest backup --type=full` vs `kubectl-soma backup postgres --physical`,
#       REPEAT times each, alternating; medians, ratio, stored bytes, peak RSS, CPU seconds;
#   (2) restore to the end of the WAL: `pgbackrest restore` vs `soma-agent restore-pgdata --target
#       latest`, each followed by starting PostgreSQL and waiting until it is promoted;
#   (3) RPO: pgbench inserts clock_timestamp() rows for RPO_SECONDS, the primary crashes
#       (pg_ctl -m immediate), `latest` is restored; committed rows lost and the time they span.
# Progress goes to stderr, a Markdown results block to stdout. KEEP_TMP=1 keeps the directory.
#
# Environment knobs:
#   SCALE=100 REPEAT=3        pgbench scale factor; backups per tool (medians reported)
#   COMPRESSION_LEVEL=3       zstd level for both tools (agent --compression-level, compress-level)
#   PGBR_PROCESS_MAX=1        pgBackRest process-max (backup and restore)
#   WAL_PARTIAL_INTERVAL=5s   soma-agent --wal-partial-interval
#   RPO_SECONDS=30 RPO_CLIENTS=4   the insert load before the crash
#   RPO_KILL_AGENT=0          1: SIGKILL the agent together with PostgreSQL (node loss)
#   RPO_GRACE=10              seconds the surviving agent gets after the crash before it is stopped
#   RPO_PGBR=1                also restore pgBackRest's `latest` after the crash (0 skips)
#   ARCHIVE_TIMEOUT=0         PostgreSQL archive_timeout (0: off, pgBackRest gets whole segments only)
#   SOMA_SKIP=1               pgBackRest only (no build, no agent)
#   plus BENCH_TMPDIR, PG_BIN, GARAGE_BIN, SOMA_SKIP_BUILD, SOMA_BIN_DIR, PART_SIZE,
#   PARTS_IN_FLIGHT, COMPRESSION_THREADS, KEEP_TMP as for bench/pg_backup.sh
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-100}
REPEAT=${REPEAT:-3}
COMPRESSION_LEVEL=${COMPRESSION_LEVEL:-3}
PGBR_PROCESS_MAX=${PGBR_PROCESS_MAX:-1}
WAL_PARTIAL_INTERVAL=${WAL_PARTIAL_INTERVAL:-5s}
RPO_SECONDS=${RPO_SECONDS:-30}
RPO_CLIENTS=${RPO_CLIENTS:-4}
RPO_KILL_AGENT=${RPO_KILL_AGENT:-0}
RPO_GRACE=${RPO_GRACE:-10}
RPO_PGBR=${RPO_PGBR:-1}
ARCHIVE_TIMEOUT=${ARCHIVE_TIMEOUT:-0}
SOMA_SKIP=${SOMA_SKIP:-0}
RECOVERY_TIMEOUT=${RECOVERY_TIMEOUT:-3600}
DB=bench
STANZA=bench
BUCKET=soma-bench
PREFIX=soma-pitr # the agent's store prefix; pgBackRest uses repo1-path=/pgbackrest
PG_SETTINGS=(
  "shared_buffers = 512MB"
  "max_wal_size = 8GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
  "wal_level = replica"
  "archive_mode = on"
  "archive_timeout = $ARCHIVE_TIMEOUT"
)
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

for v in SCALE REPEAT PGBR_PROCESS_MAX RPO_SECONDS RPO_CLIENTS RPO_GRACE; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

as_postgres() { "$@"; } # redefined when running as root
pgu() { (cd / && as_postgres "$@"); }
# shellcheck disable=SC2317 # called from the EXIT trap
pg_stop() { [[ ! -f "$1/postmaster.pid" ]] || pgu "$PG_BIN/pg_ctl" -D "$1" -m "${2:-fast}" -w -t 300 stop >/dev/null 2>&1 || true; }
FAILURE_LOGS=(agent.log garage.log stunnel.log pg/postgres.log pgbr-backup.log)
install_cleanup

psqlp() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$1" -U postgres -d "$2" "${@:3}"; } # PORT DB ARGS
sql() { psqlp "$PG_PORT" "$@"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" -v f="%.${3:-2}f" 'BEGIN { printf f, b - a }'; } # FROM TO [DECIMALS]
# CPU seconds (user + system, waited-for children included) of a running process.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15 + $16 + $17) / hz }' "/proc/$1/stat"; }
pgbr() { pgu pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" "$@"; }
# Sets RSS_KIB and CPU_S of the command run (GNU time: largest process in the tree, user + sys).
measured() {
  RSS_KIB='' CPU_S=''
  if [[ -x /usr/bin/time ]]; then
    pgu /usr/bin/time -f '%M %U %S' -o "$PGO/time.out" "$@" || return $?
    local u s
    read -r RSS_KIB u s <"$PGO/time.out"
    CPU_S=$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')
  else
    pgu "$@"
  fi
}
# JSON of pgBackRest's newest backup of the stanza.
pgbr_last_backup() {
  pgbr info --output=json >"$TMP_DIR/pgbr-info.json"
  { command -v jq >/dev/null 2>&1 && jq '.[0].backup[-1]' "$TMP_DIR/pgbr-info.json"; } ||
    python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))[0]["backup"][-1]))' "$TMP_DIR/pgbr-info.json"
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

# restore_and_promote NAME COMMAND...: COMMAND lays a cluster into $PGO/NAME (created empty),
# which is then started on a fresh port without archiving and waited for until promoted. Sets
# LAY_S, RECOVER_S, TOTAL_S, LAY_RSS_KIB, R_PORT and R_DIR; the cluster is left running.
restore_and_promote() {
  local name=$1 t0 t1 t2
  shift
  R_DIR="$PGO/$name"
  R_PORT=$(free_port) || die "no free port"
  pgu mkdir -m 700 "$R_DIR"
  sql postgres -c CHECKPOINT 2>/dev/null || true
  sync
  t0=$(now)
  measured "$@" >"$TMP_DIR/$name.log" 2>&1 || { tail -n 20 "$TMP_DIR/$name.log" >&2; die "$name: $* failed"; }
  t1=$(now)
  LAY_RSS_KIB=$RSS_KIB
  at_exit pg_stop "$R_DIR" immediate
  pgu env "${AWS_ENV[@]}" PATH="${BIN_DIR:-/nonexistent}:$PG_BIN:$PATH" "$PG_BIN/pg_ctl" -D "$R_DIR" -l "$R_DIR.log" \
    -w -t "$RECOVERY_TIMEOUT" -o "-p $R_PORT -c archive_mode=off -c unix_socket_directories=$PGO" start >/dev/null ||
    { tail -n 20 "$R_DIR.log" >&2; die "PostgreSQL did not start on $R_DIR"; }
  wait_promoted "$R_PORT" "$R_DIR"
  t2=$(now)
  LAY_S=$(secs "$t0" "$t1") RECOVER_S=$(secs "$t1" "$t2") TOTAL_S=$(secs "$t0" "$t2")
  log "$name: laid down in ${LAY_S}s, recovered and promoted in ${RECOVER_S}s: ${TOTAL_S}s"
}
drop_cluster() { pg_stop "$1" immediate && rm -rf "$1"; }

# ---------------------------------------------------------------------------------------------
log "Soma PITR benchmark vs pgBackRest: SCALE=$SCALE REPEAT=$REPEAT SOMA_SKIP=$SOMA_SKIP"
PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pgbench pg_basebackup; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
find_garage
for tool in pgbackrest stunnel openssl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install pgbackrest stunnel4 openssl)"
done
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH"
[[ "$SOMA_SKIP" == 1 ]] || build_soma
[[ -z "${BIN_DIR:-}" ]] || pgu test -x "$BIN_DIR/soma-agent" || die "the postgres user cannot run $BIN_DIR/soma-agent"
make_tmp_dir "$((SCALE * 160 * 1024))"

# --- PostgreSQL, Garage, stunnel, pgBackRest ---------------------------------------------------
PGO="$TMP_DIR/pg" # everything the postgres user writes
mkdir -m 700 "$PGO" "$PGO/pgbackrest" "$PGO/pgbackrest/log" # pgBackRest does not create log-path
[[ $(id -u) -ne 0 ]] || chown -R postgres: "$PGO"
PG_DATA="$PGO/data"
PG_PORT=$(free_port) || die "no free port"
PGBR_CONF="$PGO/pgbackrest/pgbackrest.conf"
start_garage
AWS_ENV=(AWS_ACCESS_KEY_ID="$AWS_KEY" AWS_SECRET_ACCESS_KEY="$AWS_SECRET" AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true)

# pgBackRest 2.45 only speaks HTTPS to S3: stunnel terminates TLS (self-signed) in front of Garage.
TLS_PORT=$(free_port) || die "no free port"
mkdir "$TMP_DIR/stunnel"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 -keyout "$TMP_DIR/stunnel/key.pem" \
  -out "$TMP_DIR/stunnel/cert.pem" >/dev/null 2>&1 || die "openssl could not make a certificate"
cat >"$TMP_DIR/stunnel/stunnel.conf" <<EOF
foreground = yes
pid =
debug = notice
[s3]
accept = 127.0.0.1:$TLS_PORT
connect = 127.0.0.1:$S3_PORT
cert = $TMP_DIR/stunnel/cert.pem
key = $TMP_DIR/stunnel/key.pem
EOF
stunnel "$TMP_DIR/stunnel/stunnel.conf" >"$TMP_DIR/stunnel.log" 2>&1 &
STUNNEL_PID=$!
at_exit stop_pid "$STUNNEL_PID"
for _ in $(seq 1 100); do
  [[ "$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$TLS_PORT/" || true)" != 000 ]] && break
  kill -0 "$STUNNEL_PID" 2>/dev/null || die "stunnel exited"
  sleep 0.1
done
STUNNEL_VERSION=$(stunnel -version 2>&1 | sed -n 's/^\(stunnel [0-9.]*\).*/\1/p' | head -n 1)
log "$STUNNEL_VERSION: https://127.0.0.1:$TLS_PORT -> Garage"

PGBR_VERSION=$(pgbackrest version)
umask 077
cat >"$PGBR_CONF" <<EOF
[global]
repo1-type=s3
repo1-path=/pgbackrest
repo1-s3-bucket=$BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-s3-region=us-east-1
repo1-s3-uri-style=path
repo1-s3-key=$AWS_KEY
repo1-s3-key-secret=$AWS_SECRET
repo1-storage-host=127.0.0.1
repo1-storage-port=$TLS_PORT
repo1-storage-verify-tls=n
repo1-retention-full=9999
compress-type=zst
compress-level=$COMPRESSION_LEVEL
process-max=$PGBR_PROCESS_MAX
start-fast=y
lock-path=$PGO/pgbackrest/lock
log-path=$PGO/pgbackrest/log
spool-path=$PGO/pgbackrest/spool
log-level-console=warn
log-level-file=info

[$STANZA]
pg1-path=$PG_DATA
pg1-port=$PG_PORT
pg1-socket-path=$PGO
pg1-user=postgres
EOF
umask 022
[[ $(id -u) -ne 0 ]] || chown postgres: "$PGBR_CONF"
pgu "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$TMP_DIR/initdb.log" 2>&1 ||
  { cat "$TMP_DIR/initdb.log" >&2; die "initdb failed"; }
{
  printf "\n# soma benchmark\nlisten_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n" "$PG_PORT" "$PGO"
  printf '%s\n' "${PG_SETTINGS[@]}"
  printf "archive_command = 'pgbackrest --config=%s --stanza=%s archive-push %%p'\n" "$PGBR_CONF" "$STANZA"
} >>"$PG_DATA/postgresql.conf"
pgu "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PGO/postgres.log" -w -t 120 start >/dev/null
at_exit pg_stop "$PG_DATA"
PG_SERVER_VERSION=$(sql postgres -c "SHOW server_version")
log "PostgreSQL $PG_SERVER_VERSION on 127.0.0.1:$PG_PORT"
pgbr stanza-create >"$TMP_DIR/pgbr-stanza.log" 2>&1 || { cat "$TMP_DIR/pgbr-stanza.log" >&2; die "pgbackrest stanza-create failed"; }
pgbr check >"$TMP_DIR/pgbr-check.log" 2>&1 || { cat "$TMP_DIR/pgbr-check.log" >&2; die "pgbackrest check failed"; }
log "$PGBR_VERSION: stanza $STANZA on s3://$BUCKET/pgbackrest via stunnel, archive-push works"

# --- data ----------------------------------------------------------------------------------------
LOAD_S=''
log "loading: pgbench -i -s $SCALE $DB (WAL archived by pgBackRest meanwhile)"
sql postgres -c "CREATE DATABASE $DB"
timed LOAD_S "$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" \
  >"$TMP_DIR/pgbench-init.log" 2>&1 || { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
sql "$DB" -c "CREATE TABLE rpo_log (id bigserial PRIMARY KEY, ts timestamptz NOT NULL)" -c CHECKPOINT -c "SELECT pg_switch_wal()" >/dev/null
for _ in $(seq 1 6000); do # let the archiver catch up before anything is measured
  compgen -G "$PG_DATA/pg_wal/archive_status/*.ready" >/dev/null || break
  sleep 0.1
done
DB_BYTES=$(sql "$DB" -c "SELECT pg_database_size('$DB')")
DB_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
log "database $DB: $DB_PRETTY ($DB_BYTES bytes), loaded in ${LOAD_S}s"

if [[ "$SOMA_SKIP" != 1 ]]; then
  mkdir "$TMP_DIR/wal-spool"
  start_agent --postgres-url "postgresql://postgres@127.0.0.1:$PG_PORT/$DB" --wal-stream \
    --wal-spool "$TMP_DIR/wal-spool" --wal-partial-interval "$WAL_PARTIAL_INTERVAL"
fi

# --- (1) full backups, alternating -----------------------------------------------------------------
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
PGBR_TIMES=() PGBR_RSS=() PGBR_CPU=() TLS_CPU=() SOMA_TIMES=() SOMA_RSS=() SOMA_CPU=()
t='' c0=''
for i in $(seq 1 "$REPEAT"); do
  sql postgres -c CHECKPOINT && sync
  c0=$(cpu_s "$STUNNEL_PID")
  timed t measured pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" backup --type=full >"$TMP_DIR/pgbr-backup.log" 2>&1 ||
    { cat "$TMP_DIR/pgbr-backup.log" >&2; die "pgbackrest backup failed"; }
  PGBR_TIMES+=("$t") PGBR_RSS+=("${RSS_KIB:-0}") PGBR_CPU+=("${CPU_S:-0}") TLS_CPU+=("$(secs "$c0" "$(cpu_s "$STUNNEL_PID")")")
  log "run $i/$REPEAT pgbackrest backup --type=full: ${t}s, peak RSS $(kib_mib "${RSS_KIB:-0}") MiB, CPU ${CPU_S}s (+ stunnel ${TLS_CPU[-1]}s)"
  [[ "$SOMA_SKIP" != 1 ]] || continue
  sql postgres -c CHECKPOINT && sync
  reset_peak
  c0=$(cpu_s "$AGENT_PID")
  timed t soma -o json backup postgres --physical >"$TMP_DIR/soma-backup-$i.json" 2>"$TMP_DIR/soma-backup-$i.err" ||
    { cat "$TMP_DIR/soma-backup-$i.err" >&2; die "kubectl-soma backup postgres --physical failed"; }
  SOMA_TIMES+=("$t") SOMA_RSS+=("$(proc_kib VmHWM)") SOMA_CPU+=("$(secs "$c0" "$(cpu_s "$AGENT_PID")")")
  log "run $i/$REPEAT kubectl-soma backup postgres --physical: ${t}s, agent VmHWM $(kib_mib "${SOMA_RSS[-1]}") MiB, CPU ${SOMA_CPU[-1]}s"
done
pgbr_last_backup >"$TMP_DIR/pgbr-last.json"
PGBR_STORED=$(json_field "$TMP_DIR/pgbr-last.json" info.repository.delta) || die "no repository size in pgbackrest info"
PGBR_DBSIZE=$(json_field "$TMP_DIR/pgbr-last.json" info.size) || PGBR_DBSIZE=0
PGBR_LABEL=$(json_field "$TMP_DIR/pgbr-last.json" label) || PGBR_LABEL='?'
log "pgBackRest $PGBR_LABEL: $PGBR_DBSIZE bytes, stored $PGBR_STORED bytes"
if [[ "$SOMA_SKIP" != 1 ]]; then
  SOMA_JSON="$TMP_DIR/soma-backup-$REPEAT.json"
  SOMA_ID=$(json_field "$SOMA_JSON" id) || die "no \"id\" in kubectl-soma -o json output: $(head -c 600 "$SOMA_JSON")"
  SOMA_STORED=$(json_field "$SOMA_JSON" stored_bytes) || SOMA_STORED=0
  SOMA_RAW=$(json_field "$SOMA_JSON" raw_bytes) || SOMA_RAW=0
  log "soma $SOMA_ID: raw $SOMA_RAW bytes, stored $SOMA_STORED bytes"
fi

# --- (2) restore to the end of the WAL -------------------------------------------------------------
check_restored() { # NAME: the restored cluster on R_PORT has every pgbench_accounts row
  local src dst
  src=$(sql "$DB" -c "SELECT count(*) FROM pgbench_accounts")
  dst=$(psqlp "$R_PORT" "$DB" -c "SELECT count(*) FROM pgbench_accounts" 2>/dev/null || echo "(query failed)")
  [[ "$src" == "$dst" ]] || die "$1: pgbench_accounts has $dst rows, the source $src"
  drop_cluster "$R_DIR"
}
restore_and_promote r-pgbr pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" --pg1-path="$PGO/r-pgbr" restore
PGBR_R=("$LAY_S" "$RECOVER_S" "$TOTAL_S" "${LAY_RSS_KIB:-0}")
check_restored r-pgbr
if [[ "$SOMA_SKIP" != 1 ]]; then
  restore_and_promote r-soma env "${AWS_ENV[@]}" "$BIN_DIR/soma-agent" restore-pgdata --store "$STORE_URL" \
    --backup latest --pgdata "$PGO/r-soma" --target latest
  SOMA_R=("$LAY_S" "$RECOVER_S" "$TOTAL_S" "${LAY_RSS_KIB:-0}")
  check_restored r-soma
fi

# --- (3) RPO: inserts, crash, restore latest -------------------------------------------------------
rows() { psqlp "$1" "$DB" -c "SELECT count(*), coalesce(extract(epoch FROM max(ts)), 0) FROM rpo_log"; }
RPO_LINE='' PRIMARY_ROWS='' PRIMARY_LAST='' AGENT_RPO_RSS=''
if [[ "$SOMA_SKIP" != 1 || "$RPO_PGBR" == 1 ]]; then
  printf 'INSERT INTO rpo_log (ts) VALUES (clock_timestamp());\n' >"$TMP_DIR/rpo.sql"
  log "RPO: $RPO_CLIENTS clients inserting for ${RPO_SECONDS}s, then pg_ctl -m immediate stop"
  [[ "$SOMA_SKIP" == 1 ]] || reset_peak
  "$PG_BIN/pgbench" -n -c "$RPO_CLIENTS" -j "$RPO_CLIENTS" -T "$((RPO_SECONDS + 600))" -f "$TMP_DIR/rpo.sql" \
    -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" >"$TMP_DIR/rpo-pgbench.log" 2>&1 &
  PGBENCH_PID=$!
  at_exit stop_pid "$PGBENCH_PID"
  sleep "$RPO_SECONDS"
  [[ "$SOMA_SKIP" == 1 || "$RPO_KILL_AGENT" != 1 ]] || kill -KILL "$AGENT_PID"
  pgu "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w stop >/dev/null
  wait "$PGBENCH_PID" || true
  if [[ "$SOMA_SKIP" != 1 && "$RPO_KILL_AGENT" != 1 ]]; then
    sleep "$RPO_GRACE" # the agent outlives the database (its sidecar container keeps running)
    AGENT_RPO_RSS=$(proc_kib VmHWM)
  fi
  [[ "$SOMA_SKIP" == 1 ]] || stop_pid "$AGENT_PID" # nothing may reach the store after this
  # What the primary had committed: crash recovery of its own data directory, no archiving.
  pgu "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PGO/postgres.log" -w -t 600 -o "-c archive_mode=off" start >/dev/null
  read -r PRIMARY_ROWS PRIMARY_LAST < <(rows "$PG_PORT")
  pg_stop "$PG_DATA"
  log "RPO: the primary committed $PRIMARY_ROWS rows, the last at epoch $PRIMARY_LAST"
  rpo_restore() { # NAME LABEL COMMAND...
    local name=$1 label=$2 n last window
    shift 2
    restore_and_promote "$name" "$@"
    read -r n last < <(rows "$R_PORT")
    drop_cluster "$R_DIR"
    window=$(secs "$last" "$PRIMARY_LAST" 3)
    [[ "$n" != 0 ]] || window="all ${RPO_SECONDS}"
    RPO_LINE+="| $label | $n | $((PRIMARY_ROWS - n)) | $window | $TOTAL_S |
"
    log "RPO $label: restored $n rows, lost $((PRIMARY_ROWS - n)), window ${window}s"
  }
  [[ "$SOMA_SKIP" == 1 ]] || rpo_restore r-rpo-soma "soma (WAL stream, partial every $WAL_PARTIAL_INTERVAL)" \
    env "${AWS_ENV[@]}" "$BIN_DIR/soma-agent" restore-pgdata --store "$STORE_URL" --backup latest \
    --pgdata "$PGO/r-rpo-soma" --target latest
  [[ "$RPO_PGBR" != 1 ]] || rpo_restore r-rpo-pgbr "pgBackRest (archive_command, whole segments)" \
    pgbackrest --config="$PGBR_CONF" --stanza="$STANZA" --pg1-path="$PGO/r-rpo-pgbr" restore
fi
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)

# --- results -------------------------------------------------------------------------------------
collect_run_info
med_mib() { kib_mib "$(median "$@" | cut -d . -f 1)"; }
PGBR_MED=$(median "${PGBR_TIMES[@]}")
ROWS="| pgBackRest | \`pgbackrest --stanza=$STANZA backup --type=full\` | $(join_by ', ' "${PGBR_TIMES[@]}") | $PGBR_MED | $(mib "$PGBR_STORED") MiB | $(med_mib "${PGBR_RSS[@]}") MiB (tree) | $(median "${PGBR_CPU[@]}") + stunnel $(median "${TLS_CPU[@]}") |"
RROWS="| pgBackRest | \`pgbackrest restore\` | ${PGBR_R[0]} | ${PGBR_R[1]} | ${PGBR_R[2]} | $(kib_mib "${PGBR_R[3]}") MiB |"
SUMMARY=''
if [[ "$SOMA_SKIP" != 1 ]]; then
  SOMA_MED=$(median "${SOMA_TIMES[@]}")
  ROWS+="
| soma | \`kubectl-soma backup postgres --physical\` | $(join_by ', ' "${SOMA_TIMES[@]}") | $SOMA_MED | $(mib "$SOMA_STORED") MiB | $(med_mib "${SOMA_RSS[@]}") MiB (agent VmHWM) | $(median "${SOMA_CPU[@]}") (agent + children) |"
  RROWS+="
| soma | \`soma-agent restore-pgdata --backup latest --target latest\` | ${SOMA_R[0]} | ${SOMA_R[1]} | ${SOMA_R[2]} | $(kib_mib "${SOMA_R[3]}") MiB |"
  SUMMARY="- **Backup soma / pgBackRest** (medians): **$(ratio "$SOMA_MED" "$PGBR_MED")×** ($SOMA_MED s vs $PGBR_MED s; goal ≤ 1.0)
- **Restore soma / pgBackRest** (restore + start + promoted): **$(ratio "${SOMA_R[2]}" "${PGBR_R[2]}")×** (${SOMA_R[2]} s vs ${PGBR_R[2]} s)
- **Stored**: soma \`$SOMA_ID\` stored_bytes $SOMA_STORED (raw $SOMA_RAW); pgBackRest \`$PGBR_LABEL\` repository delta $PGBR_STORED (database $PGBR_DBSIZE); soma / pgBackRest $(ratio "$SOMA_STORED" "$PGBR_STORED")×
- **Agent**: \`soma-agent ${AGENT_ARGS[*]}\`; idle RSS $(kib_mib "$IDLE_RSS_KIB") MiB, VmHWM per backup $(for k in "${SOMA_RSS[@]}"; do printf '%s ' "$(kib_mib "$k")"; done)MiB${AGENT_RPO_RSS:+, during the RPO load $(kib_mib "$AGENT_RPO_RSS") MiB} ($PEAK_NOTE)"
fi
RPO_BLOCK='' AGENT_FATE=''
if [[ "$SOMA_SKIP" != 1 ]]; then
  AGENT_FATE="; the agent ran ${RPO_GRACE}s longer (WAL stream, pg_receivewal), then was stopped"
  [[ "$RPO_KILL_AGENT" != 1 ]] || AGENT_FATE=" with the agent SIGKILLed at the same moment (node loss)"
fi
[[ -z "$RPO_LINE" ]] || RPO_BLOCK="
RPO: \`pgbench -n -c $RPO_CLIENTS -T $RPO_SECONDS\` of \`INSERT INTO rpo_log (ts) VALUES (clock_timestamp())\` (synchronous_commit = on), then \`pg_ctl -m immediate stop\`$AGENT_FATE. Committed on the primary (its own crash recovery): **$PRIMARY_ROWS rows**; each tool restores \`latest\`:

| restored by | rows | rows lost | window lost (s) | restore + promote (s) |
|---|---|---|---|---|
${RPO_LINE%$'\n'}"

log "done; results follow on stdout"
cat <<EOF

### PostgreSQL physical backup / PITR: soma vs pgBackRest — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $PGBR_VERSION, $STUNNEL_VERSION, $GARAGE_VERSION (single node, 127.0.0.1, \`compression_level = "none"\`), ${AGENT_VERSION:-soma-agent} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`SCALE=$SCALE REPEAT=$REPEAT PGBR_PROCESS_MAX=$PGBR_PROCESS_MAX$(agent_knobs)$([[ "$SOMA_SKIP" == 1 ]] && echo " SOMA_SKIP=1") bench/pg_pitr.sh\`
- **pgBackRest**: repo1-type=s3 through stunnel (TLS, self-signed, verify-tls=n) to Garage, compress-type=zst, compress-level=$COMPRESSION_LEVEL, process-max=$PGBR_PROCESS_MAX, start-fast=y, archive_command = archive-push
- **PostgreSQL settings**: $(join_by ', ' "${PG_SETTINGS[@]}"); CHECKPOINT + sync before every backup and restore
- **Data**: \`pgbench -i -s $SCALE\` (${LOAD_S}s to load, WAL archived meanwhile) → $DB_PRETTY ($DB_BYTES bytes)

| tool | backup command | runs (s) | median (s) | stored | peak RSS | CPU s (median) |
|---|---|---|---|---|---|---|
$ROWS

| tool | restore | lay down (s) | recovery to promoted (s) | total (s) | peak RSS of the restore command |
|---|---|---|---|---|---|
$RROWS

$SUMMARY
$RPO_BLOCK
EOF
