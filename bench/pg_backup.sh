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
PART_SIZE=${PART_SIZE:-}
PARTS_IN_FLIGHT=${PARTS_IN_FLIGHT:-}
COMPRESSION_THREADS=${COMPRESSION_THREADS:-}
COMPRESSION_LEVEL=${COMPRESSION_LEVEL:-}
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

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Clean-up on every exit

TMP_DIR=''
PG_DATA=''
PG_STARTED=0
AGENT_PID=''
GARAGE_PID=''
as_postgres() { "$@"; } # redefined when running as root

# shellcheck disable=SC2317 # called from the EXIT trap
stop_pid() {
  local pid=$1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$?
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
  if [[ $rc -ne 0 && -n "$TMP_DIR" ]]; then
    for f in agent.log garage.log pg/postgres.log; do
      if [[ -s "$TMP_DIR/$f" ]]; then
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 20 "$TMP_DIR/$f" >&2
      fi
    done
    log "FAILED (exit code $rc)"
  fi
  stop_pid "$AGENT_PID"
  stop_pid "$GARAGE_PID"
  if [[ $PG_STARTED -eq 1 ]]; then
    (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null 2>&1)
  fi
  if [[ -n "$TMP_DIR" && -d "$TMP_DIR" ]]; then
    if [[ -n "${KEEP_TMP:-}" ]]; then
      log "kept $TMP_DIR"
    else
      rm -rf "$TMP_DIR"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Helpers

find_pg_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then
    printf '%s\n' "$PG_BIN"
    return
  fi
  local dir
  dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$dir" ]] && command -v pg_config >/dev/null 2>&1; then dir=$(pg_config --bindir); fi
  printf '%s\n' "$dir"
}

free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      printf '%s\n' "$port"
      return 0
    fi
  done
  return 1
}

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

sql() {
  local db=$1
  shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# timed VAR command...: runs the command and stores its wall time in seconds in VAR.
timed() {
  local __var=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  "$@" || return $?
  t1=$(date +%s.%N)
  printf -v "$__var" '%.2f' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
mib_per_s() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", b / 1048576 / s; else print "n/a" }'; }
join_by() {
  local sep=$1 out=''
  shift
  for v in "$@"; do out+="${out:+$sep}$v"; done
  printf '%s' "$out"
}

# A top-level field of a JSON document (the manifest printed by `kubectl-soma -o json`).
json_field() {
  local file=$1 key=$2
  if command -v jq >/dev/null 2>&1; then
    jq -er --arg k "$key" '.[$k] | if type == "string" then . else tojson end' "$file"
  else
    python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(v)' "$file" "$key"
  fi
}

# Agent memory, from /proc/PID/status (kB values).
proc_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$AGENT_PID/status"; }
# Resets VmHWM to the current RSS (Linux >= 4.0), so the next reading is one operation's peak.
PEAK_IS_PER_OPERATION=1
reset_peak() { { echo 5 >"/proc/$AGENT_PID/clear_refs"; } 2>/dev/null || PEAK_IS_PER_OPERATION=0; }

soma() { "$BIN_DIR/kubectl-soma" --agent "$AGENT_ADDR" "$@"; }

# ---------------------------------------------------------------------------------------------
log "Soma Backup benchmark: SCALE=$SCALE REPEAT=$REPEAT"

PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pg_dump pg_restore pgbench; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
[[ -x "$GARAGE_BIN" ]] || die "garage not found (cargo install garage@2.5.0 --locked, or set GARAGE_BIN)"
command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the S3 bucket"
command -v jq >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 || die "jq or python3 is needed to read the manifest"
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH" # the agent's pg_dump / pg_restore match the server

BIN_DIR=${SOMA_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}
if [[ -z "${SOMA_SKIP_BUILD:-}" ]]; then
  log "building release binaries: cargo build --release --bins -p soma-agent -p kubectl-soma"
  (cd "$REPO_ROOT" && cargo build --release --bins -p soma-agent -p kubectl-soma) >&2
fi
for bin in soma-agent kubectl-soma; do
  [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin is missing"
done

# --- temp dir and disk space -------------------------------------------------------------------
BASE_TMP=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
TMP_DIR=$(mktemp -d "$BASE_TMP/soma-bench.XXXXXX")
chmod 755 "$TMP_DIR"
need_kib=$((SCALE * 100 * 1024))
have_kib=$(df -Pk "$TMP_DIR" | awk 'NR == 2 { print $4 }')
((have_kib > need_kib)) || log "WARNING: $((have_kib / 1024)) MiB free in $BASE_TMP, the run may need ~$((need_kib / 1024)) MiB"
log "working directory $TMP_DIR"

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
PG_STARTED=1
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
S3_PORT=$(free_port) || die "no free port"
RPC_PORT=$(free_port) || die "no free port"
AWS_KEY="GK$(random_hex 12)"
AWS_SECRET=$(random_hex 32)
mkdir -p "$TMP_DIR/garage"
cat >"$TMP_DIR/garage/garage.toml" <<EOF
metadata_dir = "$TMP_DIR/garage/meta"
data_dir = "$TMP_DIR/garage/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
EOF
GARAGE_VERSION=$("$GARAGE_BIN" --version 2>/dev/null | head -n 1 | sed 's/ *\[.*//' || true)
GARAGE_VERSION=${GARAGE_VERSION:-garage (version unknown)}
GARAGE_DEFAULT_ACCESS_KEY=$AWS_KEY GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET GARAGE_DEFAULT_BUCKET=$BUCKET \
  "$GARAGE_BIN" -c "$TMP_DIR/garage/garage.toml" server --single-node --default-bucket \
  >"$TMP_DIR/garage.log" 2>&1 &
GARAGE_PID=$!
# Garage listens before the key and bucket exist: wait for an authenticated HeadBucket.
bucket_ready=0
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
for _ in $(seq 1 300); do
  kill -0 "$GARAGE_PID" 2>/dev/null || die "garage exited"
  code=$(curl -s -o /dev/null -w '%{http_code}' -I --aws-sigv4 "aws:amz:us-east-1:s3" \
    -H "x-amz-content-sha256: $EMPTY_SHA256" --user "$AWS_KEY:$AWS_SECRET" "http://127.0.0.1:$S3_PORT/$BUCKET" || true)
  if [[ "$code" == 200 ]]; then
    bucket_ready=1
    break
  fi
  sleep 0.2
done
[[ $bucket_ready -eq 1 ]] || die "Garage bucket $BUCKET not ready after 60 s (last HTTP status $code)"
log "$GARAGE_VERSION: S3 on 127.0.0.1:$S3_PORT, bucket $BUCKET"

# --- soma-agent ---------------------------------------------------------------------------------
STORE_URL="s3://$BUCKET/$PREFIX"
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB"
AGENT_ARGS=(--listen 127.0.0.1:0 --store "$STORE_URL" --postgres-url "$PG_URL")
[[ -z "$PART_SIZE" ]] || AGENT_ARGS+=(--part-size "$PART_SIZE")
[[ -z "$PARTS_IN_FLIGHT" ]] || AGENT_ARGS+=(--parts-in-flight "$PARTS_IN_FLIGHT")
[[ -z "$COMPRESSION_LEVEL" ]] || AGENT_ARGS+=(--compression-level "$COMPRESSION_LEVEL")
[[ -z "$COMPRESSION_THREADS" ]] || AGENT_ARGS+=(--compression-threads "$COMPRESSION_THREADS")
AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=$AWS_KEY AWS_SECRET_ACCESS_KEY=$AWS_SECRET \
  AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
  "$BIN_DIR/soma-agent" "${AGENT_ARGS[@]}" >"$TMP_DIR/agent.log" 2>&1 &
AGENT_PID=$!
AGENT_ADDR=''
for _ in $(seq 1 300); do
  AGENT_ADDR=$(sed -n 's/.*soma-agent listening on \(127\.0\.0\.1:[0-9][0-9]*\).*/\1/p' "$TMP_DIR/agent.log" | head -n 1)
  [[ -n "$AGENT_ADDR" ]] && break
  kill -0 "$AGENT_PID" 2>/dev/null || die "soma-agent exited before it was ready"
  sleep 0.1
done
[[ -n "$AGENT_ADDR" ]] || die "soma-agent did not print 'soma-agent listening on ...' within 30 s"
IDLE_RSS_KIB=$(proc_kib VmRSS)
AGENT_VERSION=$("$BIN_DIR/soma-agent" --version 2>/dev/null | head -n 1 || true)
log "soma-agent ${AGENT_VERSION:+($AGENT_VERSION) }on $AGENT_ADDR, pid $AGENT_PID, idle RSS $(mib "$((IDLE_RSS_KIB * 1024))") MiB"

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
settle() { sql postgres -c "CHECKPOINT" && sync; }
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
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_TOTAL=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
OS_NAME=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null || true)
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[[ -z "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null | head -n 1)" ]] || GIT_REV+=" + uncommitted changes"
RUSTC_VERSION=$(rustc --version 2>/dev/null || echo "rustc unknown")
KNOBS="SCALE=$SCALE REPEAT=$REPEAT"
for k in PART_SIZE PARTS_IN_FLIGHT COMPRESSION_LEVEL COMPRESSION_THREADS; do
  [[ -z "${!k}" ]] || KNOBS+=" $k=${!k}"
done
if [[ $PEAK_IS_PER_OPERATION -eq 1 ]]; then
  PEAK_NOTE="VmHWM reset (clear_refs 5) before each operation, read right after it"
else
  PEAK_NOTE="VmHWM could not be reset: each value is the peak since the agent started"
fi
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

- **Machine**: $(nproc) CPUs ($CPU_MODEL), $MEM_TOTAL RAM, $OS_NAME, Linux $(uname -r)
- **Load average** (1/5/15 min) when the measurements started: $LOAD_BEFORE; when they ended: $LOAD_AFTER
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
