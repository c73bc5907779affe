#!/usr/bin/env bash
# Soma Backup benchmark: what a misbehaving S3 endpoint costs a backup and a restore, side by side
# in one run on the same database, store and machine.
#
# Starts a throwaway PostgreSQL and a single-node Garage S3 server on 127.0.0.1, loads a pgbench
# database plus $RANDOM_MB MiB of incompressible rows, and starts the tests' fault-injecting proxy
# (tests/src/bin/fault-proxy.rs) in front of Garage: per connection, SLOW_DOWN % are answered
# 503 SlowDown, RESET % are reset within the first 4 MiB, FREEZE % are accepted and never answered,
# and every other connection is reset once it carried up to 32 MiB (so the agent's kept-alive
# connections keep meeting new fates). Two agents back up the same database, one prefix each: one
# straight to Garage, one through the proxy (with --store-attempt-timeout $ATTEMPT_TIMEOUT so a
# frozen connection is dropped after that long). Alternating the two REPEAT times:
#   (a) kubectl-soma backup postgres --database bench          clean
#   (b) the same                                               through the faults
#   (c) kubectl-soma restore <id> --database bench_restored    clean
#   (d) the same                                               through the faults
# Medians and their ratios (faults / clean) are reported, with the faults met and the agent's
# retry counts from status.
#
# Progress goes to stderr; a Markdown results block goes to stdout. Everything is removed on exit
# (KEEP_TMP=1 keeps the directory).
#
# Environment knobs:
#   SCALE=10 REPEAT=3 RANDOM_MB=128    data and rounds, as in encryption.sh
#   SLOW_DOWN=5 RESET=5 FREEZE=2       fault percentages per connection
#   ATTEMPT_TIMEOUT=5s                 --store-attempt-timeout of the agent behind the proxy
#   PART_SIZE, PARTS_IN_FLIGHT, COMPRESSION_LEVEL, COMPRESSION_THREADS   agent knobs
#   BENCH_TMPDIR, PG_BIN, GARAGE_BIN, SOMA_SKIP_BUILD, SOMA_BIN_DIR, KEEP_TMP   as in lib.sh
#   PROXY_BIN=PATH                     fault-proxy binary (default: built with cargo, debug)
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-10}
REPEAT=${REPEAT:-3}
RANDOM_MB=${RANDOM_MB:-128}
SLOW_DOWN=${SLOW_DOWN:-5}
RESET=${RESET:-5}
FREEZE=${FREEZE:-2}
ATTEMPT_TIMEOUT=${ATTEMPT_TIMEOUT:-5s}
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

for v in SCALE REPEAT; do [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }; done
for v in RANDOM_MB SLOW_DOWN RESET FREEZE; do [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a non-negative integer" >&2; exit 2; }; done

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

FAILURE_LOGS=(agent-clean.log agent-faults.log proxy.log garage.log pg/postgres.log)
install_cleanup

log "Soma Backup S3 faults benchmark: SCALE=$SCALE REPEAT=$REPEAT faults ${SLOW_DOWN}/${RESET}/${FREEZE} %"
find_pg_tools
find_garage
build_soma
if [[ -z "${PROXY_BIN:-}" ]]; then
  (cd "$REPO_ROOT" && cargo build -q -p soma-tests --bin fault-proxy) >&2
  PROXY_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/fault-proxy
fi
[[ -x "$PROXY_BIN" ]] || die "$PROXY_BIN is missing"
make_tmp_dir "$(((SCALE * 100 + RANDOM_MB * 4) * 1024 * 4))"

# --- PostgreSQL --------------------------------------------------------------------------------
start_postgres
load_pgbench "$DB"
add_incompressible_rows "$DB" "$RANDOM_MB"
db_size "$DB"

start_garage
# The proxy reads its standard input until it closes: a FIFO this script holds open keeps it quiet.
mkfifo "$TMP_DIR/proxy.in"
# shellcheck disable=SC2034 # held open, never written
exec {PROXY_IN}<>"$TMP_DIR/proxy.in"
"$PROXY_BIN" "http://127.0.0.1:$S3_PORT" "slow_down=$SLOW_DOWN" "reset=$RESET" "freeze=$FREEZE" \
  freeze_for=60 reset_within=$((4 << 20)) recycle_within=$((32 << 20)) seed=14 \
  <"$TMP_DIR/proxy.in" >"$TMP_DIR/proxy.out" 2>"$TMP_DIR/proxy.log" &
PROXY_PID=$!
at_exit stop_pid "$PROXY_PID"
wait_for_line PROXY_URL "$TMP_DIR/proxy.out" 's/^fault-proxy listening on \(http:[^ ]*\)$/\1/p' "$PROXY_PID" fault-proxy 'fault-proxy listening on ...'
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB"
PREFIX=clean AGENT_LOG=agent-clean.log start_agent --postgres-url "$PG_URL"
CLEAN_ADDR=$AGENT_ADDR
PREFIX=faults AGENT_LOG=agent-faults.log AGENT_S3_ENDPOINT=$PROXY_URL start_agent --postgres-url "$PG_URL" \
  --store-attempt-timeout "$ATTEMPT_TIMEOUT" --store-retries 12
FAULT_ADDR=$AGENT_ADDR
# --- measurements ------------------------------------------------------------------------------
side_by_side clean "$CLEAN_ADDR" faults "$FAULT_ADDR"
MET=$(tail -n 1 "$TMP_DIR/proxy.log")
HEALTH=$(soma_at "$FAULT_ADDR" -o json status | python3 -c 'import json, sys
h = json.load(sys.stdin)[0]["store_health"]
print("%s retries, %s attempts dropped for want of an answer, %s downloads resumed, %s requests failed" % (h["retries"], h["timeouts"], h["resumed_downloads"], h["failures"]))')

# shellcheck disable=SC2086 # the run lists are space-separated on purpose
{
  BC=$(median ${BACKUPS[clean]}) BF=$(median ${BACKUPS[faults]})
  RC=$(median ${RESTORES[clean]}) RF=$(median ${RESTORES[faults]})
}
collect_run_info
log "done; results follow on stdout"
cat <<EOF2

### S3 faults: through the fault proxy vs straight to the store, one run — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $GARAGE_VERSION (single node, 127.0.0.1), ${AGENT_VERSION:-soma-agent} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`SCALE=$SCALE REPEAT=$REPEAT RANDOM_MB=$RANDOM_MB SLOW_DOWN=$SLOW_DOWN RESET=$RESET FREEZE=$FREEZE ATTEMPT_TIMEOUT=$ATTEMPT_TIMEOUT$(agent_knobs) bench/faults.sh\` (binaries: $BIN_DIR)
- **Data**: \`pgbench -i -s $SCALE\` and $RANDOM_MB MiB of random bytea → $DB_PRETTY ($DB_BYTES bytes); compressed dump $(mib "${STORED[clean]}") MiB
- **Faults met** (connections, whole run): $MET; the agent behind the proxy counted $HEALTH

| step | clean runs (s) | through faults runs (s) | clean median | faults median | faults / clean |
|---|---|---|---|---|---|
| backup (\`kubectl-soma backup postgres --database $DB\`) | ${BACKUPS[clean]% } | ${BACKUPS[faults]% } | $BC | $BF | **$(ratio "$BF" "$BC")×** |
| restore (\`kubectl-soma restore <id> --database $RESTORED_DB\`) | ${RESTORES[clean]% } | ${RESTORES[faults]% } | $RC | $RF | **$(ratio "$RF" "$RC")×** |
EOF2
