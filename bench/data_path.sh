#!/usr/bin/env bash
# Soma Backup benchmark: the agent's data path against the raw tools it wraps, every ratio in ONE
# run, side by side, so machine noise hits both sides of each ratio alike (issue 10, point 8).
#
# Starts on 127.0.0.1 a throwaway PostgreSQL loaded with `pgbench -i -s $SCALE`, a single-node
# Garage S3 server, the Qdrant 1.18 REST test double with one collection of QDRANT_MIB
# incompressible MiB, and a release soma-agent with `--store s3://…` against all three. Then:
#   (a) pg_dump -Fc -Z0 > /dev/null                        vs (b) kubectl-soma backup postgres
#   (c) pg_basebackup -Ft -X none -c fast -D - > /dev/null vs (d) kubectl-soma backup postgres --physical
#       plus two floors for (d), same rounds: the same pg_basebackup into a pipe read by `cat`
#       (what any consumer of its output pays), and into `zstd -T1 -LEVEL | sha256sum` (the CLI
#       doing the agent's compression; sha256sum hashes only the small compressed output)
#   (e) pg_restore --single-transaction of a local file    vs (f) kubectl-soma restore <id of (b)>
#   (g) kubectl-soma backup qdrant --collection big         (peak RSS of the snapshot path to S3)
# Each pair runs REPEAT times, alternating which side goes first; a CHECKPOINT and a `sync` come
# before every physical backup and every restore so none pays for an earlier step's dirty pages.
# Reported: every run, medians, spread (min–max), the ratio of the medians and the range of the
# per-round ratios, the agent's peak RSS per path (VmHWM, reset before each operation), and how
# many CPU-seconds other processes took while it ran (the 2 cores are shared).
#
# Progress on stderr, a Markdown block for RESULTS.md on stdout:
#   bench/data_path.sh > /tmp/data_path.md
#
# Environment knobs:
#   SCALE=60               pgbench scale (60 ≈ 900 MB database, ≈ 590 MiB dump)
#   REPEAT=3               rounds of every pair
#   QDRANT_MIB=212         size of the Qdrant double's collection
#   PART_SIZE, PARTS_IN_FLIGHT, COMPRESSION_LEVEL, COMPRESSION_THREADS   agent flags (unset: defaults)
#   BENCH_TMPDIR, PG_BIN, GARAGE_BIN, SOMA_SKIP_BUILD, SOMA_BIN_DIR, QDRANT_DOUBLE_BIN, KEEP_TMP
#                          as in pg_backup.sh / qdrant_snapshot.sh
#   SOMA_BUILT_AT=REV      with SOMA_SKIP_BUILD: the commit the prebuilt binaries come from (printed)
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-60}
REPEAT=${REPEAT:-3}
QDRANT_MIB=${QDRANT_MIB:-212}
DB=bench
COLLECTION=big
BUCKET=soma-bench
PREFIX=datapath
PG_SETTINGS=(
  "shared_buffers = 512MB"
  "max_wal_size = 8GB"
  "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB"
)

unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE
unset SOMA_QDRANT_API_KEY SOMA_QDRANT_MODE SOMA_QDRANT_CA_CERT SOMA_QDRANT_URL

for v in SCALE REPEAT QDRANT_MIB; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

QDRANT_PID=''
STDIN_HOLDER_PID=''
# PG_DATA, as_postgres, stop_postgres and sql come from bench/lib.sh.
FAILURE_LOGS=(agent.log garage.log qdrant.log pg/postgres.log)
install_cleanup

pg() { "$PG_BIN/$1" -h 127.0.0.1 -p "$PG_PORT" -U postgres "${@:2}"; }

# agent_step VAR_TIME VAR_PEAK OUT ARGS...: times `kubectl-soma ARGS...` after resetting the
# agent's peak RSS (stdout in $TMP_DIR/OUT).
agent_step() {
  local __t=$1 __p=$2 out=$3 tt
  shift 3
  START_RSS_KIB+=("$(proc_kib VmRSS)")
  reset_peak
  timed tt soma "$@" >"$TMP_DIR/$out" 2>"$TMP_DIR/$out.err" ||
    { cat "$TMP_DIR/$out.err" >&2; die "kubectl-soma $* failed"; }
  printf -v "$__t" '%s' "$tt"
  printf -v "$__p" '%s' "$(proc_kib VmHWM)"
}

# CPU accounting in clock ticks: the whole machine's busy time, and this benchmark's share (this
# shell and every child it reaped, the agent and what it reaped (pg_dump, pg_basebackup,
# pg_restore), Garage, the double, and the postmaster with every backend it reaped or still runs).
machine_busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
own_ticks() {
  local total pid pm
  total=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$$/stat")
  pm=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)
  for pid in "$AGENT_PID" "$GARAGE_PID" "$QDRANT_PID" "$pm" $(pgrep -P "$pm" 2>/dev/null || true); do
    [[ -n "$pid" ]] || continue
    total=$((total + $(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  printf '%s\n' "$total"
}
ticks_s() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", t / hz }'; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f–%.2f", lo, hi }'; }
max_kib() { printf '%s\n' "$@" | sort -n | tail -n 1; }
peaks_mib() { for k in "$@"; do printf '%s ' "$(kib_mib "$k")"; done; }

# ---------------------------------------------------------------------------------------------
log "Soma Backup data-path benchmark: SCALE=$SCALE REPEAT=$REPEAT QDRANT_MIB=$QDRANT_MIB"
PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pg_dump pg_restore pg_basebackup pgbench; do
  [[ -x "$PG_BIN/$tool" ]] || die "PostgreSQL tool $tool not found in '${PG_BIN}' (set PG_BIN)"
done
find_garage
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root: PostgreSQL needs an unprivileged 'postgres' user"
  as_postgres() { runuser -u postgres -- "$@"; }
fi
export PATH="$PG_BIN:$PATH"
find_qdrant_double
make_tmp_dir "$(((SCALE * 70 + 4 * QDRANT_MIB + 1024) * 1024))"

# --- PostgreSQL --------------------------------------------------------------------------------
mkdir "$TMP_DIR/pg"
[[ $(id -u) -ne 0 ]] || chown postgres: "$TMP_DIR/pg"
PG_DATA="$TMP_DIR/pg/data"
PG_PORT=$(free_port) || die "no free port"
(cd / && as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync) \
  >"$TMP_DIR/initdb.log" 2>&1 || { cat "$TMP_DIR/initdb.log" >&2; die "initdb failed"; }
{
  printf '\nlisten_addresses = '\''127.0.0.1'\''\nport = %s\nunix_socket_directories = '\''%s'\''\n' "$PG_PORT" "$TMP_DIR/pg"
  printf '%s\n' "${PG_SETTINGS[@]}"
} >>"$PG_DATA/postgresql.conf"
(cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP_DIR/pg/postgres.log" -w -t 120 start) >/dev/null
at_exit stop_postgres
PG_SERVER_VERSION=$(sql postgres -c "SHOW server_version")
sql postgres -c "CREATE DATABASE $DB"
LOAD_S=''
timed LOAD_S pg pgbench -i -s "$SCALE" -q "$DB" >"$TMP_DIR/pgbench-init.log" 2>&1 ||
  { cat "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
settle
DB_PRETTY=$(sql "$DB" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
log "PostgreSQL $PG_SERVER_VERSION on 127.0.0.1:$PG_PORT, $DB = $DB_PRETTY (loaded in ${LOAD_S}s)"

# --- Garage, the Qdrant double, the agent ------------------------------------------------------
start_garage
start_qdrant_double "$COLLECTION:$QDRANT_MIB"
start_agent --postgres-url "postgresql://postgres@127.0.0.1:$PG_PORT/$DB" --qdrant-url "$QDRANT_URL"

# --- measurements ------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
T0=$(date +%s.%N)
BUSY0=$(machine_busy_ticks)
OWN0=$(own_ticks)
DUMP_T=() LOGICAL_T=() LOGICAL_KIB=() BASE_T=() PHYS_T=() PHYS_KIB=() CAT_T=() ZSTD_T=()
PGRESTORE_T=() RESTORE_T=() RESTORE_KIB=() QDRANT_T=() QDRANT_KIB=()
t='' k=''
START_RSS_KIB=() # the agent's RSS when each operation started: the floor of its peak

raw_dump() { timed t pg pg_dump -Fc -Z0 -d "$DB" >/dev/null || die "pg_dump failed"; DUMP_T+=("$t"); }
soma_logical() {
  agent_step t k "logical-$1.json" -o json backup postgres --database "$DB"
  LOGICAL_T+=("$t") LOGICAL_KIB+=("$k")
}
raw_base() {
  settle
  timed t pg pg_basebackup -Ft -X none -c fast -D - >/dev/null 2>"$TMP_DIR/basebackup.err" ||
    { cat "$TMP_DIR/basebackup.err" >&2; die "pg_basebackup failed"; }
  BASE_T+=("$t")
}
floor_cat() {
  settle
  timed t bash -c "$(printf '%q ' "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -Ft -X none -c fast -D -) 2>/dev/null | cat > /dev/null"
  CAT_T+=("$t")
}
floor_zstd() {
  settle
  timed t bash -c "$(printf '%q ' "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -Ft -X none -c fast -D -) 2>/dev/null | zstd -q -T1 -${COMPRESSION_LEVEL:-3} -c | sha256sum > /dev/null"
  ZSTD_T+=("$t")
}
soma_physical() {
  settle
  agent_step t k "physical-$1.json" -o json backup postgres --physical
  PHYS_T+=("$t") PHYS_KIB+=("$k")
}
for i in $(seq 1 "$REPEAT"); do
  if ((i % 2)); then raw_dump; soma_logical "$i"; else soma_logical "$i"; raw_dump; fi
  log "round $i/$REPEAT logical: pg_dump ${DUMP_T[-1]}s, soma ${LOGICAL_T[-1]}s ($(kib_mib "${LOGICAL_KIB[-1]}") MiB)"
  if ((i % 2)); then raw_base; soma_physical "$i"; else soma_physical "$i"; raw_base; fi
  floor_cat
  floor_zstd
  log "round $i/$REPEAT physical: pg_basebackup ${BASE_T[-1]}s, soma ${PHYS_T[-1]}s ($(kib_mib "${PHYS_KIB[-1]}") MiB); floors: | cat ${CAT_T[-1]}s, | zstd | sha256sum ${ZSTD_T[-1]}s"
done
LOGICAL_ID=$(json_field "$TMP_DIR/logical-$REPEAT.json" id) || die "no id in the logical backup's manifest"
RAW_BYTES=$(json_field "$TMP_DIR/logical-$REPEAT.json" raw_bytes) || die "no raw_bytes"
STORED_BYTES=$(json_field "$TMP_DIR/logical-$REPEAT.json" stored_bytes) || die "no stored_bytes"
PHYS_RAW=$(json_field "$TMP_DIR/physical-$REPEAT.json" raw_bytes) || die "no raw_bytes (physical)"
PHYS_STORED=$(json_field "$TMP_DIR/physical-$REPEAT.json" stored_bytes) || die "no stored_bytes (physical)"

pg pg_dump -Fc -Z0 -d "$DB" -f "$TMP_DIR/bench.dump"
DUMP_FILE_BYTES=$(stat -c %s "$TMP_DIR/bench.dump")
raw_restore() {
  sql postgres -c "CREATE DATABASE pgrestore_$1"
  settle
  timed t pg pg_restore --single-transaction --exit-on-error -d "pgrestore_$1" "$TMP_DIR/bench.dump" ||
    die "pg_restore failed"
  PGRESTORE_T+=("$t")
  sql postgres -c "DROP DATABASE pgrestore_$1"
}
soma_restore() {
  settle
  agent_step t k "restore-$1.out" restore "$LOGICAL_ID" --database "restored_$1"
  RESTORE_T+=("$t") RESTORE_KIB+=("$k")
}
CHECK_SQL="SELECT (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_accounts t),
                  (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_branches t),
                  (SELECT count(*) || '/' || sum(hashtext(t::text)::bigint) FROM pgbench_tellers t),
                  (SELECT count(*) FROM pg_indexes WHERE schemaname = 'public')"
SRC_CHECK=$(sql "$DB" -c "$CHECK_SQL")
RESTORE_CHECK=''
for i in $(seq 1 "$REPEAT"); do
  if ((i % 2)); then raw_restore "$i"; soma_restore "$i"; else soma_restore "$i"; raw_restore "$i"; fi
  if [[ -z "$RESTORE_CHECK" ]]; then
    DST_CHECK=$(sql "restored_$i" -c "$CHECK_SQL") || DST_CHECK="(query failed)"
    [[ "$SRC_CHECK" == "$DST_CHECK" ]] && RESTORE_CHECK="identical (row counts, per-table row checksums, index count)" ||
      RESTORE_CHECK="DIFFERENT: source '$SRC_CHECK', restored '$DST_CHECK'"
  fi
  sql postgres -c "DROP DATABASE restored_$i"
  log "round $i/$REPEAT restore: pg_restore ${PGRESTORE_T[-1]}s, soma ${RESTORE_T[-1]}s ($(kib_mib "${RESTORE_KIB[-1]}") MiB)"
done
rm -f "$TMP_DIR/bench.dump"

for i in $(seq 1 "$REPEAT"); do
  sync
  agent_step t k "qdrant-$i.json" -o json backup qdrant --collection "$COLLECTION"
  QDRANT_T+=("$t") QDRANT_KIB+=("$k")
  log "round $i/$REPEAT qdrant backup: ${t}s ($(kib_mib "$k") MiB)"
done
QDRANT_RAW=$(json_field "$TMP_DIR/qdrant-$REPEAT.json" raw_bytes) || die "no raw_bytes (qdrant)"

WALL_S=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
BUSY_T=$(($(machine_busy_ticks) - BUSY0))
OWN_T=$(($(own_ticks) - OWN0))
OTHERS_T=$((BUSY_T - OWN_T))
((OTHERS_T >= 0)) || OTHERS_T=0
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)

# --- results -----------------------------------------------------------------------------------
collect_run_info
# Prebuilt binaries from another commit (SOMA_SKIP_BUILD) say so, instead of the work tree's commit.
GIT_REV=${SOMA_BUILT_AT:-$GIT_REV}
# per-round ratios, for the spread of each ratio
round_ratios() { # round_ratios NUMS... -- DENS...
  local -a num=() den=()
  while [[ $1 != -- ]]; do num+=("$1"); shift; done
  shift
  den=("$@")
  for j in "${!num[@]}"; do ratio "${num[j]}" "${den[j]}"; echo; done
}
pair() { # pair NAME RAW_CMD RAW_TIMES... -- SOMA_TIMES... -- PEAKS...
  local name=$1 rawcmd=$2
  shift 2
  local -a raw=() soma=() peaks=()
  while [[ $1 != -- ]]; do raw+=("$1"); shift; done
  shift
  while [[ $1 != -- ]]; do soma+=("$1"); shift; done
  shift
  peaks=("$@")
  local rm sm rr
  rm=$(median "${raw[@]}")
  sm=$(median "${soma[@]}")
  mapfile -t rr < <(round_ratios "${soma[@]}" -- "${raw[@]}")
  printf '| %s | %s | %s | %s (%s) | %s | %s (%s) | **%s×** (rounds %s) | %s |\n' \
    "$name" "$rawcmd" "$(join_by ', ' "${raw[@]}")" "$rm" "$(spread "${raw[@]}")" \
    "$(join_by ', ' "${soma[@]}")" "$sm" "$(spread "${soma[@]}")" "$(ratio "$sm" "$rm")" "$(join_by ' ' "${rr[@]}")" \
    "$(kib_mib "$(max_kib "${peaks[@]}")") MiB (runs: $(peaks_mib "${peaks[@]}" | sed 's/ $//'))"
}
log "done; results follow on stdout"
cat <<EOF

### Data path: soma vs the raw tools, one run — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **CPU while measuring**: ${WALL_S} s wall × $(nproc) CPUs; busy $(ticks_s "$BUSY_T") CPU-s, of which this benchmark's processes (agent and its tools, PostgreSQL, Garage, the double, the raw tools) $(ticks_s "$OWN_T") and **other processes $(ticks_s "$OTHERS_T")**
- **Versions**: PostgreSQL $PG_SERVER_VERSION, $GARAGE_VERSION (single node, 127.0.0.1, \`compression_level = "none"\`), ${AGENT_VERSION:-soma-agent} at $GIT_REV, $RUSTC_VERSION
- **Command**: \`SCALE=$SCALE REPEAT=$REPEAT QDRANT_MIB=$QDRANT_MIB$(agent_knobs) bench/data_path.sh\`
- **Agent**: \`soma-agent ${AGENT_ARGS[*]}\` (release; S3 = Garage via \`AWS_ENDPOINT_URL\`)
- **Data**: \`pgbench -i -s $SCALE\` → $DB_PRETTY; logical dump raw $(mib "$RAW_BYTES") MiB → stored $(mib "$STORED_BYTES") MiB; base backup raw $(mib "$PHYS_RAW") MiB → stored $(mib "$PHYS_STORED") MiB; local dump file $(mib "$DUMP_FILE_BYTES") MiB; Qdrant double collection of $(mib "$QDRANT_RAW") MiB incompressible bytes
- **Restore check**: first \`restored_N\` vs \`$DB\`: $RESTORE_CHECK

| path | raw command | raw runs (s) | raw median (spread) | soma runs (s) | soma median (spread) | soma / raw | agent peak RSS |
|---|---|---|---|---|---|---|---|
$(pair "logical backup → S3" "\`pg_dump -Fc -Z0 > /dev/null\`" "${DUMP_T[@]}" -- "${LOGICAL_T[@]}" -- "${LOGICAL_KIB[@]}")
$(pair "physical base backup → S3" "\`pg_basebackup -Ft -X none -c fast -D - > /dev/null\`" "${BASE_T[@]}" -- "${PHYS_T[@]}" -- "${PHYS_KIB[@]}")
$(pair "logical restore ← S3" "\`pg_restore --single-transaction --exit-on-error\` of the local file" "${PGRESTORE_T[@]}" -- "${RESTORE_T[@]}" -- "${RESTORE_KIB[@]}")
| floor: base backup into a pipe | \`pg_basebackup … \| cat > /dev/null\` | | | $(join_by ', ' "${CAT_T[@]}") | $(median "${CAT_T[@]}") ($(spread "${CAT_T[@]}")) | $(ratio "$(median "${CAT_T[@]}")" "$(median "${BASE_T[@]}")")× | |
| floor: base backup through zstd (sha256 of its output) | \`pg_basebackup … \| zstd -q -T1 -${COMPRESSION_LEVEL:-3} -c \| sha256sum > /dev/null\` | | | $(join_by ', ' "${ZSTD_T[@]}") | $(median "${ZSTD_T[@]}") ($(spread "${ZSTD_T[@]}")) | $(ratio "$(median "${ZSTD_T[@]}")" "$(median "${BASE_T[@]}")")× | |
| Qdrant collection backup → S3 | (peak RSS only) | | | $(join_by ', ' "${QDRANT_T[@]}") | $(median "${QDRANT_T[@]}") ($(spread "${QDRANT_T[@]}")) | | $(kib_mib "$(max_kib "${QDRANT_KIB[@]}")") MiB (runs: $(peaks_mib "${QDRANT_KIB[@]}" | sed 's/ $//')) |

- Agent idle RSS $(kib_mib "$IDLE_RSS_KIB") MiB at start; RSS when each operation started, in run order (logical/physical per round, then restores, then Qdrant): $(peaks_mib "${START_RSS_KIB[@]}")MiB; peaks are VmHWM ($PEAK_NOTE; \`clear_refs\` resets it to the RSS at that moment, so a peak never reads below the RSS the agent already held)
- The soma side of each ratio is the whole \`kubectl-soma\` command (gRPC, manifest, commit included); the raw side is the tool alone writing to /dev/null (restore: reading a local file)
EOF
