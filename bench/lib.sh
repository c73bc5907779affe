# shellcheck shell=bash
# Shared by the benchmark scripts in bench/: sourced, never run on its own.
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
#
# Gives: logging (log, die), clean-up on every exit (install_cleanup, at_exit, stop_pid,
# FAILURE_LOGS, TMP_DIR, make_tmp_dir), small helpers (free_port, random_hex, timed, median, ratio,
# mib, mib_per_s, join_by, json_field), the release binaries (build_soma, BIN_DIR), a throwaway
# Garage S3 server (find_garage, start_garage), the agent (start_agent, soma, proc_kib,
# reset_peak) and the facts every results block starts with (collect_run_info, machine_line,
# load_line, agent_knobs).
#
# The sourcing script sets `set -Eeuo pipefail` and `LC_ALL=C` itself, and defines REPO_ROOT,
# BUCKET and PREFIX before calling start_garage / start_agent.

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Clean-up on every exit

TMP_DIR=''
FAILURE_LOGS=() # files under TMP_DIR whose last lines are shown when the run fails
EXIT_HOOKS=()   # commands run on exit, the last registered first
AGENT_PID=''
GARAGE_PID=''

# at_exit COMMAND [ARGS...]: run the command on exit (arguments are expanded now, not then).
at_exit() {
  local cmd
  printf -v cmd '%q ' "$@"
  EXIT_HOOKS+=("$cmd")
}

# stop_pid PID: TERM, up to 10 s, then KILL; safe under `set -e`.
# shellcheck disable=SC2317 # called from the EXIT trap
stop_pid() {
  local pid=$1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return 0
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$? i f
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
  # A signal is handled when the command it interrupted returns, with that command's
  # redirections still in place (`timed t soma ... 2>FILE`): report on the script's own stderr.
  exec 2>&"$SCRIPT_STDERR"
  if [[ $rc -ne 0 && -n "$TMP_DIR" ]]; then
    for f in "${FAILURE_LOGS[@]}"; do
      if [[ -s "$TMP_DIR/$f" ]]; then
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 20 "$TMP_DIR/$f" >&2
      fi
    done
    log "FAILED (exit code $rc)"
  fi
  for ((i = ${#EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
    eval "${EXIT_HOOKS[i]}"
  done
  if [[ -n "$TMP_DIR" && -d "$TMP_DIR" ]]; then
    if [[ -n "${KEEP_TMP:-}" ]]; then
      log "kept $TMP_DIR"
    else
      rm -rf "$TMP_DIR"
    fi
  fi
  exit "$rc"
}

SCRIPT_STDERR=2
install_cleanup() {
  exec {SCRIPT_STDERR}>&2
  trap 'log "ERROR: exit code $? from: $BASH_COMMAND (line $LINENO)"' ERR
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# make_tmp_dir NEED_KIB [warn|die]: creates TMP_DIR under BENCH_TMPDIR (default $TMPDIR or /tmp)
# and checks that about NEED_KIB are free there.
make_tmp_dir() {
  local need_kib=$1 on_short=${2:-warn} have_kib msg
  BASE_TMP=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
  TMP_DIR=$(mktemp -d "$BASE_TMP/soma-bench.XXXXXX")
  chmod 755 "$TMP_DIR"
  have_kib=$(df -Pk "$TMP_DIR" | awk 'NR == 2 { print $4 }')
  if ((have_kib <= need_kib)); then
    msg="$((have_kib / 1024)) MiB free in $BASE_TMP, the run may need ~$((need_kib / 1024)) MiB"
    [[ "$on_short" == die ]] && die "$msg (set BENCH_TMPDIR to a bigger disk)"
    log "WARNING: $msg"
  fi
  log "working directory $TMP_DIR"
}

# ---------------------------------------------------------------------------------------------
# Helpers


# wait_for_line VAR FILE SED_SCRIPT PID WHAT EXPECTED: waits up to 30 s until `sed -n SED_SCRIPT
# FILE` prints something (a server's "listening on" line) and stores its first line in VAR; dies
# when PID exits first.
wait_for_line() {
  local __var=$1 file=$2 script=$3 pid=$4 what=$5 expected=$6 __line=''
  for _ in $(seq 1 300); do
    __line=$(sed -n "$script" "$file" | head -n 1)
    [[ -n "$__line" ]] && break
    kill -0 "$pid" 2>/dev/null || die "$what exited before it was ready"
    sleep 0.1
  done
  [[ -n "$__line" ]] || die "$what did not print '$expected' within 30 s"
  printf -v "$__var" '%s' "$__line"
}

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

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

# json_field FILE KEY[.KEY...]: a field of a JSON document (the manifest printed by
# `kubectl-soma -o json`, a Qdrant answer); strings as they are, anything else as JSON. Fails
# when the field is missing or null.
json_field() {
  local file=$1 key=$2
  if command -v jq >/dev/null 2>&1; then
    jq -er --arg k "$key" 'getpath($k | split(".")) | select(. != null) | if type == "string" then . else tojson end' "$file"
  else
    python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
if v is None:
    sys.exit(1)
print(v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))' "$file" "$key"
  fi
}

# ---------------------------------------------------------------------------------------------
# Tools and binaries

# Sets GARAGE_BIN and checks the tools every benchmark needs (curl, jq or python3).
find_garage() {
  GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
  [[ -x "$GARAGE_BIN" ]] || die "garage not found (cargo install garage@2.5.0 --locked, or set GARAGE_BIN)"
  command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the S3 bucket"
  command -v jq >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 || die "jq or python3 is needed to read the manifest"
}

# build_soma [CARGO ARGS...]: release build of soma-agent and kubectl-soma (plus what the
# arguments add) unless SOMA_SKIP_BUILD is set; sets BIN_DIR.
# shellcheck disable=SC2120 # the arguments are optional
build_soma() {
  local cmd=(cargo build --release --bins -p soma-agent -p kubectl-soma "$@")
  BIN_DIR=${SOMA_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}
  if [[ -z "${SOMA_SKIP_BUILD:-}" ]]; then
    log "building release binaries: ${cmd[*]}"
    (cd "$REPO_ROOT" && "${cmd[@]}") >&2
  fi
  for bin in soma-agent kubectl-soma; do
    [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin is missing"
  done
}

# ---------------------------------------------------------------------------------------------
# Garage S3: single node on 127.0.0.1, data in $TMP_DIR/garage, log in $TMP_DIR/garage.log.
# Sets S3_PORT, AWS_KEY, AWS_SECRET, GARAGE_VERSION, GARAGE_PID and waits for bucket $BUCKET.
# Called again after stop_garage, it starts Garage with the same ports and key on whatever is
# left in $TMP_DIR/garage/{meta,data} (remove them for an empty bucket).

start_garage() {
  local rpc_port code='' bucket_ready=0
  local empty_sha256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
  if [[ ! -f "$TMP_DIR/garage/garage.toml" ]]; then
    S3_PORT=$(free_port) || die "no free port"
    rpc_port=$(free_port) || die "no free port"
    AWS_KEY="GK$(random_hex 12)"
    AWS_SECRET=$(random_hex 32)
    mkdir -p "$TMP_DIR/garage"
    cat >"$TMP_DIR/garage/garage.toml" <<EOF
metadata_dir = "$TMP_DIR/garage/meta"
data_dir = "$TMP_DIR/garage/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
EOF
    GARAGE_VERSION=$("$GARAGE_BIN" --version 2>/dev/null | head -n 1 | sed 's/ *\[.*//' || true)
    GARAGE_VERSION=${GARAGE_VERSION:-garage (version unknown)}
    at_exit stop_garage
  fi
  GARAGE_DEFAULT_ACCESS_KEY=$AWS_KEY GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET GARAGE_DEFAULT_BUCKET=$BUCKET \
    "$GARAGE_BIN" -c "$TMP_DIR/garage/garage.toml" server --single-node --default-bucket \
    >>"$TMP_DIR/garage.log" 2>&1 &
  GARAGE_PID=$!
  # Garage listens before the key and bucket exist: wait for an authenticated HeadBucket.
  for _ in $(seq 1 300); do
    kill -0 "$GARAGE_PID" 2>/dev/null || die "garage exited"
    code=$(curl -s -o /dev/null -w '%{http_code}' -I --aws-sigv4 "aws:amz:us-east-1:s3" \
      -H "x-amz-content-sha256: $empty_sha256" --user "$AWS_KEY:$AWS_SECRET" "http://127.0.0.1:$S3_PORT/$BUCKET" || true)
    if [[ "$code" == 200 ]]; then
      bucket_ready=1
      break
    fi
    sleep 0.2
  done
  [[ $bucket_ready -eq 1 ]] || die "Garage bucket $BUCKET not ready after 60 s (last HTTP status $code)"
  log "$GARAGE_VERSION: S3 on 127.0.0.1:$S3_PORT, bucket $BUCKET"
}

# shellcheck disable=SC2317 # also called from the EXIT trap
stop_garage() {
  stop_pid "$GARAGE_PID"
  GARAGE_PID=''
}

# ---------------------------------------------------------------------------------------------
# soma-agent, release build, against Garage (store s3://$BUCKET/$PREFIX), log in $TMP_DIR/agent.log

PART_SIZE=${PART_SIZE:-}
PARTS_IN_FLIGHT=${PARTS_IN_FLIGHT:-}
COMPRESSION_THREADS=${COMPRESSION_THREADS:-}
COMPRESSION_LEVEL=${COMPRESSION_LEVEL:-}

# The agent knobs that are set, as `NAME=value ...` for the printed command line.
agent_knobs() {
  local k out=''
  for k in PART_SIZE PARTS_IN_FLIGHT COMPRESSION_LEVEL COMPRESSION_THREADS; do
    [[ -z "${!k}" ]] || out+=" $k=${!k}"
  done
  printf '%s' "$out"
}

# start_agent ENGINE ARGS...: starts the agent with the engine's arguments and the knobs above,
# logging to $TMP_DIR/$AGENT_LOG (default agent.log), S3 at $AGENT_S3_ENDPOINT (default: the Garage
# started here); sets STORE_URL, AGENT_ARGS, AGENT_PID,
# AGENT_ADDR, IDLE_RSS_KIB and AGENT_VERSION.
start_agent() {
  STORE_URL="s3://$BUCKET/$PREFIX"
  AGENT_ARGS=(--listen 127.0.0.1:0 --store "$STORE_URL" "$@")
  [[ -z "$PART_SIZE" ]] || AGENT_ARGS+=(--part-size "$PART_SIZE")
  [[ -z "$PARTS_IN_FLIGHT" ]] || AGENT_ARGS+=(--parts-in-flight "$PARTS_IN_FLIGHT")
  [[ -z "$COMPRESSION_LEVEL" ]] || AGENT_ARGS+=(--compression-level "$COMPRESSION_LEVEL")
  [[ -z "$COMPRESSION_THREADS" ]] || AGENT_ARGS+=(--compression-threads "$COMPRESSION_THREADS")
  AWS_ENDPOINT_URL="${AGENT_S3_ENDPOINT:-http://127.0.0.1:$S3_PORT}" AWS_ACCESS_KEY_ID=$AWS_KEY AWS_SECRET_ACCESS_KEY=$AWS_SECRET \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    "$BIN_DIR/soma-agent" "${AGENT_ARGS[@]}" >"$TMP_DIR/${AGENT_LOG:-agent.log}" 2>&1 &
  AGENT_PID=$!
  at_exit stop_pid "$AGENT_PID"
  wait_for_line AGENT_ADDR "$TMP_DIR/${AGENT_LOG:-agent.log}" 's/.*soma-agent listening on \(127\.0\.0\.1:[0-9][0-9]*\).*/\1/p' \
    "$AGENT_PID" soma-agent 'soma-agent listening on ...'
  IDLE_RSS_KIB=$(proc_kib VmRSS)
  AGENT_VERSION=$("$BIN_DIR/soma-agent" --version 2>/dev/null | head -n 1 || true)
  log "soma-agent ${AGENT_VERSION:+($AGENT_VERSION) }on $AGENT_ADDR, pid $AGENT_PID, idle RSS $(mib "$((IDLE_RSS_KIB * 1024))") MiB"
}

soma() { "$BIN_DIR/kubectl-soma" --agent "$AGENT_ADDR" "$@"; }

# Agent memory, from /proc/PID/status (kB values).
proc_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$AGENT_PID/status"; }
# Resets VmHWM to the current RSS (Linux >= 4.0), so the next reading is one operation's peak.
PEAK_IS_PER_OPERATION=1
reset_peak() { { echo 5 >"/proc/$AGENT_PID/clear_refs"; } 2>/dev/null || PEAK_IS_PER_OPERATION=0; }
# A kB reading as MiB.
kib_mib() { mib "$(($1 * 1024))"; }

# ---------------------------------------------------------------------------------------------
# The facts every results block starts with

# Sets CPU_MODEL, MEM_TOTAL, OS_NAME, GIT_REV, RUSTC_VERSION and PEAK_NOTE.
# shellcheck disable=SC2034 # read by the scripts that source this file
collect_run_info() {
  CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  MEM_TOTAL=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
  OS_NAME=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null || true)
  GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
  [[ -z "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null | head -n 1)" ]] || GIT_REV+=" + uncommitted changes"
  RUSTC_VERSION=$(rustc --version 2>/dev/null || echo "rustc unknown")
  if [[ $PEAK_IS_PER_OPERATION -eq 1 ]]; then
    PEAK_NOTE="VmHWM reset (clear_refs 5) before each operation, read right after it"
  else
    PEAK_NOTE="VmHWM could not be reset: each value is the peak since the agent started"
  fi
}

machine_line() { printf -- '- **Machine**: %s CPUs (%s), %s RAM, %s, Linux %s\n' "$(nproc)" "$CPU_MODEL" "$MEM_TOTAL" "$OS_NAME" "$(uname -r)"; }
load_line() { printf -- '- **Load average** (1/5/15 min) when the measurements started: %s; when they ended: %s\n' "$1" "$2"; }

# --- the Qdrant double (tests/examples/qdrant-double) ------------------------------------------
# Builds (unless SOMA_SKIP_BUILD) and finds the double: QDRANT_DOUBLE_BIN.
find_qdrant_double() {
  build_soma -p soma-tests --example qdrant-double
  QDRANT_DOUBLE_BIN=${QDRANT_DOUBLE_BIN:-$BIN_DIR/examples/qdrant-double}
  [[ -x "$QDRANT_DOUBLE_BIN" ]] || die "$QDRANT_DOUBLE_BIN is missing (cargo build --release -p soma-tests --example qdrant-double)"
}

# Starts the double serving COLLECTION:MIB and sets QDRANT_URL. The double serves until its stdin
# closes: a `sleep` holds the FIFO open (a descriptor kept in this shell would be inherited by the
# agent and keep it open), killing it closes it.
start_qdrant_double() {
  mkdir "$TMP_DIR/qdrant"
  mkfifo "$TMP_DIR/qdrant.stdin"
  TMPDIR="$TMP_DIR/qdrant" "$QDRANT_DOUBLE_BIN" "$1" <"$TMP_DIR/qdrant.stdin" >"$TMP_DIR/qdrant.log" 2>&1 &
  QDRANT_PID=$!
  sleep infinity >"$TMP_DIR/qdrant.stdin" &
  STDIN_HOLDER_PID=$!
  at_exit stop_double
  QDRANT_URL=''
  wait_for_line QDRANT_URL "$TMP_DIR/qdrant.log" 's|^qdrant double listening on \(http://127\.0\.0\.1:[0-9][0-9]*\)$|\1|p' \
    "$QDRANT_PID" "the Qdrant double" 'qdrant double listening on ...'
}

# Closes the double's stdin, gives it 30 s to exit on its own, then stops it.
# shellcheck disable=SC2317 # called from the EXIT trap and at the end
stop_double() {
  stop_pid "$STDIN_HOLDER_PID"
  STDIN_HOLDER_PID=''
  [[ -n "$QDRANT_PID" ]] || return 0
  for _ in $(seq 1 300); do
    kill -0 "$QDRANT_PID" 2>/dev/null || break
    sleep 0.1
  done
  stop_pid "$QDRANT_PID"
  QDRANT_PID=''
}

# start_qdrant_double_named NAME [COLLECTION:MIB ...]: start_qdrant_double for a benchmark that
# runs several doubles one after another (an old platform, then empty new ones): the disk, log and
# stdin FIFO are named after NAME ($TMP_DIR/NAME, NAME.log, NAME.stdin) and any number of
# collections is served, none for an empty Qdrant. Sets QDRANT_URL, QDRANT_PID and
# STDIN_HOLDER_PID like start_qdrant_double; the previous double must be stopped (stop_double).
# shellcheck disable=SC2034 # QDRANT_URL is read by the scripts that source this file
start_qdrant_double_named() {
  local name=$1
  shift
  [[ -z "${QDRANT_PID:-}" ]] || die "a Qdrant double is still running (pid $QDRANT_PID): stop_double first"
  mkdir "$TMP_DIR/$name"
  mkfifo "$TMP_DIR/$name.stdin"
  TMPDIR="$TMP_DIR/$name" "$QDRANT_DOUBLE_BIN" "$@" <"$TMP_DIR/$name.stdin" >"$TMP_DIR/$name.log" 2>&1 &
  QDRANT_PID=$!
  sleep infinity >"$TMP_DIR/$name.stdin" &
  STDIN_HOLDER_PID=$!
  at_exit stop_double
  QDRANT_URL=''
  wait_for_line QDRANT_URL "$TMP_DIR/$name.log" 's|^qdrant double listening on \(http://127\.0\.0\.1:[0-9][0-9]*\)$|\1|p' \
    "$QDRANT_PID" "the Qdrant double $name" 'qdrant double listening on ...'
}

# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL for the benchmarks that load pgbench (drill.sh, encryption.sh).

PG_DATA=''
as_postgres() { "$@"; } # redefined by find_pg_tools when running as root
# shellcheck disable=SC2317 # called from the EXIT trap
stop_postgres() { (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null 2>&1); }

sql() {
  local db=$1
  shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -F ' ' -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# find_pg_tools: sets PG_BIN (checking the tools the benchmarks run), runs the server as the
# `postgres` user when this script runs as root, and puts PG_BIN first on PATH.
find_pg_tools() {
  PG_BIN=$(find_pg_bin)
  local tool
  for tool in initdb pg_ctl postgres psql pg_dump pg_restore pgbench; do
    [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
  done
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
    # shellcheck disable=SC2317 # called through the name, by start_postgres and the scripts
    as_postgres() { runuser -u postgres -- "$@"; }
  fi
  export PATH="$PG_BIN:$PATH"
}

# start_postgres: a cluster in $TMP_DIR/pg on a free port with ${PG_SETTINGS[@]}, stopped on exit;
# sets PG_DATA, PG_PORT and PG_SERVER_VERSION.
# shellcheck disable=SC2034 # read by the scripts that source this file
start_postgres() {
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
}

# load_pgbench DB: creates DB and runs `pgbench -i -s $SCALE` into it; sets LOAD_S.
# shellcheck disable=SC2034 # read by the scripts that source this file
load_pgbench() {
  LOAD_S=''
  log "loading: pgbench -i -s $SCALE $1"
  sql postgres -c "CREATE DATABASE $1"
  timed LOAD_S "$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$1" \
    >"$TMP_DIR/pgbench-init.log" 2>&1 || { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
}

# add_incompressible_rows DB MIB: table blobs with MIB MiB of pseudo-random bytes (1 KiB of md5
# output per row) that zstd cannot shrink, so every byte crosses the pipeline at full size.
add_incompressible_rows() {
  log "adding $2 MiB of incompressible rows (table blobs)"
  sql "$1" -c "CREATE TABLE blobs AS SELECT i, decode((SELECT string_agg(md5(random()::text || i || j), '') FROM generate_series(1, 64) j), 'hex') AS b FROM generate_series(1, $(($2 * 1024))) i"
}

# db_size DB: after a checkpoint, sets DB_BYTES and DB_PRETTY and logs the size.
# shellcheck disable=SC2034 # read by the scripts that source this file
db_size() {
  sql "$1" -c "CHECKPOINT"
  DB_BYTES=$(sql "$1" -c "SELECT pg_database_size('$1')")
  DB_PRETTY=$(sql "$1" -c "SELECT pg_size_pretty(pg_database_size('$1'))")
  log "database $1: $DB_PRETTY"
}

# --- side-by-side runs -----------------------------------------------------------------------------
soma_at() {
  local addr=$1
  shift
  "$BIN_DIR/kubectl-soma" --agent "$addr" "$@"
}
settle() { sql postgres -c "CHECKPOINT" && sync; }

# side_by_side NAME_A ADDR_A NAME_B ADDR_B: $REPEAT rounds of a logical backup of $DB and its
# restore into $RESTORED_DB by two agents, taking turns so that both meet the same machine.
# Fills BACKUPS[name] and RESTORES[name] (seconds, space-separated), IDS[name] and STORED[name]
# (the last backup's id and stored bytes), LOAD_BEFORE and LOAD_AFTER.
# shellcheck disable=SC2034 # the arrays and loads are the callers' results
side_by_side() {
  local -A addr=(["$1"]=$2 ["$3"]=$4)
  local sides=("$1" "$3") side i t=''
  declare -gA BACKUPS=() RESTORES=() IDS=() STORED=()
  LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
  for i in $(seq 1 "$REPEAT"); do
    for side in "${sides[@]}"; do
      settle
      timed t soma_at "${addr[$side]}" -o json backup postgres --database "$DB" >"$TMP_DIR/backup-$side-$i.json" 2>"$TMP_DIR/backup.err" ||
        { cat "$TMP_DIR/backup.err" >&2; die "backup ($side) failed"; }
      BACKUPS[$side]+="$t "
      IDS[$side]=$(json_field "$TMP_DIR/backup-$side-$i.json" id)
      STORED[$side]=$(json_field "$TMP_DIR/backup-$side-$i.json" stored_bytes)
      log "round $i/$REPEAT backup ($side): ${t}s"
    done
    for side in "${sides[@]}"; do
      sql postgres -c "DROP DATABASE IF EXISTS $RESTORED_DB"
      settle
      timed t soma_at "${addr[$side]}" restore "${IDS[$side]}" --database "$RESTORED_DB" >"$TMP_DIR/restore.out" 2>&1 ||
        { cat "$TMP_DIR/restore.out" >&2; die "restore ($side) failed"; }
      RESTORES[$side]+="$t "
      log "round $i/$REPEAT restore ($side): ${t}s"
    done
  done
  LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)
}
