#!/usr/bin/env bash
# Soma Backup benchmark: Qdrant snapshots streamed to S3 versus a raw download of the same
# snapshot, in one run, side by side.
#
# Starts a single-node Garage S3 server and the Qdrant 1.18 REST test double (the soma-tests
# example `qdrant-double`; no real Qdrant can run here) with one collection `big` of SIZE_MIB of
# incompressible data, starts a release soma-agent against both and measures wall times of:
#   (d) curl: POST /collections/big/snapshots?wait=true, GET it > /dev/null, DELETE it
#                                                    the raw snapshot transfer, nothing else
#   (f) curl: the same as (d), but the GET piped into one PUT of the object into Garage
#                                                    the floor of storing it at all: no hash of
#                                                    ours, no compression, one request
#   (a) kubectl-soma backup qdrant --collection big  snapshot on the node → stream → zstd
#                                                    where it pays (pipeline::adaptive) → sha256
#                                                    → S3, snapshot deleted from the node
#   (e) curl: GET /collections/big/shards/0/snapshot > /dev/null
#                                                    the raw shard stream, nothing else
#   (b) kubectl-soma backup qdrant --collection big --stream-shards
#                                                    the shard archive streamed → zstd → S3
#   (c) kubectl-soma restore <id of (a)> --collection big --as big_copy
#                                                    S3 → checks → Qdrant's snapshot upload
# REPEAT times each, interleaved in the order (d), (f), (a), (e), (b), (c), and the agent's peak
# RSS (VmHWM from /proc/PID/status, reset before each operation). Every operation starts after
# a `sync`, so none pays for the previous one's dirty pages; big_copy is deleted (untimed)
# before each restore. Garage is restarted empty (same ports and key, untimed) before each round
# after the first: it frees deleted objects' blocks only 10 minutes later, so that is the way to
# keep the disk use to one round's.
#
# Progress goes to stderr; a Markdown results block goes to stdout, so
#   bench/qdrant_snapshot.sh > /tmp/results.md
# keeps just the block. Everything is removed on exit (KEEP_TMP=1 keeps the directory).
#
# Environment knobs:
#   SIZE_MIB=4096            size of the collection's data (the snapshot is a little larger)
#   REPEAT=3                 how many rounds of (d), (a), (e), (b), (c); medians are reported
#   PART_SIZE=16MiB          passed to soma-agent --part-size          (unset: agent default)
#   PARTS_IN_FLIGHT=N        passed to soma-agent --parts-in-flight     (unset: agent default)
#   COMPRESSION_THREADS=N    passed to soma-agent --compression-threads (unset: agent default)
#   COMPRESSION_LEVEL=N      passed to soma-agent --compression-level   (unset: agent default)
#   BENCH_TMPDIR=DIR         where the data goes (default $TMPDIR or /tmp); needs about
#                            5 × SIZE_MIB + 1 GiB free (a round's two backups and (f) in Garage,
#                            then the uploaded snapshot and the restored copy on the double's disk)
#   GARAGE_BIN=PATH          garage binary (default: garage on PATH, then ~/.cargo/bin/garage)
#   SOMA_SKIP_BUILD=1        do not run cargo; SOMA_BIN_DIR=DIR says where the binaries are
#   QDRANT_DOUBLE_BIN=PATH   the double (default: $SOMA_BIN_DIR/examples/qdrant-double)
#   KEEP_TMP=1               keep the temporary directory
set -Eeuo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-4096}
REPEAT=${REPEAT:-3}
COLLECTION=big
COPY=big_copy
BUCKET=soma-bench
PREFIX=qdrant

# The double has no API key; the agent must not pick up another mode or key from the environment.
unset SOMA_QDRANT_API_KEY SOMA_QDRANT_MODE SOMA_QDRANT_CA_CERT SOMA_QDRANT_URL

[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || { echo "SIZE_MIB must be a positive integer" >&2; exit 2; }
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a positive integer" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

# ---------------------------------------------------------------------------------------------
# Clean-up on every exit (bench/lib.sh): agent, double and Garage are stopped, TMP_DIR removed

QDRANT_PID=''
STDIN_HOLDER_PID=''
FAILURE_LOGS=(agent.log garage.log qdrant.log)
install_cleanup

# ---------------------------------------------------------------------------------------------
# Helpers

# After a failed request: if the double is gone, say how it ended instead of what failed.
double_check() {
  local status=0
  [[ -n "$QDRANT_PID" ]] && ! kill -0 "$QDRANT_PID" 2>/dev/null || return 0
  wait "$QDRANT_PID" || status=$?
  QDRANT_PID=''
  die "the Qdrant double is gone (exit status $status$( ((status <= 128)) || echo ", signal $((status - 128))"))"
}

# q METHOD PATH [curl args...]: one request to the double, answer body on stdout.
q() {
  local method=$1 path=$2
  shift 2
  curl -sS --fail-with-body -X "$method" "$@" "$QDRANT_URL$path" || { double_check; return 1; }
}

# Round (d): create a snapshot, download it to /dev/null, delete it; sets the three times and
# the bytes received.
raw_snapshot_transfer() {
  local i=$1 name size
  timed RAW_CREATE_S q POST "/collections/$COLLECTION/snapshots?wait=true" >"$TMP_DIR/raw-snapshot-$i.json" ||
    die "creating a snapshot failed: $(head -c 600 "$TMP_DIR/raw-snapshot-$i.json")"
  name=$(json_field "$TMP_DIR/raw-snapshot-$i.json" result.name) || die "no snapshot name: $(head -c 600 "$TMP_DIR/raw-snapshot-$i.json")"
  size=$(json_field "$TMP_DIR/raw-snapshot-$i.json" result.size) || die "no snapshot size"
  timed RAW_GET_S download_snapshot "$name" || die "downloading snapshot $name failed"
  [[ "$RAW_GOT" == "$size" ]] || die "downloaded $RAW_GOT bytes of snapshot $name, Qdrant announced $size"
  timed RAW_DELETE_S q DELETE "/collections/$COLLECTION/snapshots/$name?wait=true" >/dev/null ||
    die "deleting snapshot $name failed"
}

# Round (f): like (d), with the download streamed into one PUT of the object into Garage
# (chunked, unsigned payload: what the agent pays for on top is everything else); sets
# RAW_S3_S and checks the stored size.
raw_snapshot_to_s3() {
  local i=$1 name size stored
  q POST "/collections/$COLLECTION/snapshots?wait=true" >"$TMP_DIR/raw-s3-snapshot-$i.json" ||
    die "creating a snapshot failed: $(head -c 600 "$TMP_DIR/raw-s3-snapshot-$i.json")"
  name=$(json_field "$TMP_DIR/raw-s3-snapshot-$i.json" result.name) || die "no snapshot name"
  size=$(json_field "$TMP_DIR/raw-s3-snapshot-$i.json" result.size) || die "no snapshot size"
  q GET "/collections/$COLLECTION/snapshots/$name" -o - |
    curl -sS --fail-with-body -K "$TMP_DIR/s3.curlrc" --aws-sigv4 "aws:amz:us-east-1:s3" \
      -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T - \
      "http://127.0.0.1:$S3_PORT/$BUCKET/floor/snapshot-$i" >"$TMP_DIR/raw-s3-put-$i.out" ||
    die "streaming snapshot $name into Garage failed: $(head -c 600 "$TMP_DIR/raw-s3-put-$i.out")"
  q DELETE "/collections/$COLLECTION/snapshots/$name?wait=true" >/dev/null || die "deleting snapshot $name failed"
  stored=$(curl -sS --fail -K "$TMP_DIR/s3.curlrc" --aws-sigv4 "aws:amz:us-east-1:s3" -I \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
    "http://127.0.0.1:$S3_PORT/$BUCKET/floor/snapshot-$i" | tr -d '\r' | awk 'tolower($1) == "content-length:" { print $2 }')
  [[ "$stored" == "$size" ]] || die "Garage holds $stored bytes of snapshot $name, Qdrant announced $size"
}

download_snapshot() {
  RAW_GOT=$(q GET "/collections/$COLLECTION/snapshots/$1" -o /dev/null -w '%{size_download}')
}

# Round (e): stream the shard snapshot to /dev/null; sets the bytes received.
raw_shard_stream() {
  RAW_SHARD_GOT=$(q GET "/collections/$COLLECTION/shards/0/snapshot" -o /dev/null -w '%{size_download}')
}

# CPU seconds the agent, Garage and the double have used so far, as "agent garage double".
cpu_now() {
  local pid out=()
  for pid in "$AGENT_PID" "$GARAGE_PID" "$QDRANT_PID"; do
    out+=("$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)")
  done
  printf '%s\n' "${out[*]}"
}
# cpu_since "BEFORE": what each used since BEFORE (from cpu_now), in seconds, as "agent garage double".
cpu_since() {
  awk -v a="$1" -v b="$(cpu_now)" -v hz="$(getconf CLK_TCK)" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    printf "%.2f %.2f %.2f\n", (y[1] - x[1]) / hz, (y[2] - x[2]) / hz, (y[3] - x[3]) / hz }'
}

# agent_step OUT ARGS...: after a sync and a reset of the agent's peak RSS, times `kubectl-soma
# ARGS...` (stdout in $TMP_DIR/OUT); sets t and PEAK_KIB.
agent_step() {
  local out=$1
  shift
  sync
  reset_peak
  local cpu0
  cpu0=$(cpu_now)
  timed t soma "$@" >"$TMP_DIR/$out" 2>"$TMP_DIR/$out.err" ||
    { cat "$TMP_DIR/$out.err" >&2; double_check; die "kubectl-soma $* failed"; }
  PEAK_KIB=$(proc_kib VmHWM)
  CPU=$(cpu_since "$cpu0")
}

# manifest_id OUT: the backup id in the manifest kubectl-soma printed to $TMP_DIR/OUT.
manifest_id() {
  json_field "$TMP_DIR/$1" id || die "no \"id\" in the manifest: $(head -c 600 "$TMP_DIR/$1")"
}

# CPU accounting, in clock ticks: how busy the whole machine was, and how much of that was this
# benchmark (this shell and every child it has reaped, plus the live agent, Garage and double).
# The difference is other sessions' work competing for the same CPUs.
machine_busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
own_ticks() {
  local total pid
  total=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$$/stat")
  for pid in "$AGENT_PID" "$GARAGE_PID" "$QDRANT_PID"; do
    [[ -n "$pid" ]] || continue
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  printf '%s\n' "$total"
}
ticks_s() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", t / hz }'; }

add() { awk -v a="$1" -v b="$2" -v c="${3:-0}" 'BEGIN { printf "%.2f", a + b + c }'; }
max_kib() { printf '%s\n' "$@" | sort -n | tail -n 1; }
peaks_mib() { for k in "$@"; do printf '%s ' "$(kib_mib "$k")"; done; }

# ---------------------------------------------------------------------------------------------
log "Soma Backup Qdrant benchmark: SIZE_MIB=$SIZE_MIB REPEAT=$REPEAT"

find_garage
curl --help all 2>/dev/null | grep -q -- '--fail-with-body' || die "curl >= 7.76 (--fail-with-body) is needed"
find_qdrant_double

# --- temp dir and disk space -------------------------------------------------------------------
make_tmp_dir "$(((5 * SIZE_MIB + 1024) * 1024))" die

# --- Garage S3 ---------------------------------------------------------------------------------
start_garage
# The key reaches curl in a file, not on its command line.
(umask 077 && printf 'user = "%s:%s"\n' "$AWS_KEY" "$AWS_SECRET" >"$TMP_DIR/s3.curlrc")

# --- the Qdrant double ---------------------------------------------------------------------------
start_qdrant_double "$COLLECTION:$SIZE_MIB"
q GET / >"$TMP_DIR/qdrant-version.json" || die "GET / failed"
QDRANT_VERSION=$(json_field "$TMP_DIR/qdrant-version.json" version) || die "no version in GET /"
q GET "/collections/$COLLECTION" >"$TMP_DIR/collection.json" || die "GET /collections/$COLLECTION failed"
POINTS=$(json_field "$TMP_DIR/collection.json" result.points_count) || die "no points_count"
VECTORS=$(json_field "$TMP_DIR/collection.json" result.config.params.vectors) || die "no vector params"
log "Qdrant double (reports $QDRANT_VERSION) on $QDRANT_URL, pid $QDRANT_PID: collection $COLLECTION, $SIZE_MIB MiB, $POINTS points"

# --- soma-agent ---------------------------------------------------------------------------------
start_agent --qdrant-url "$QDRANT_URL"

# --- measurements ------------------------------------------------------------------------------
RAW_CREATE_S='' RAW_GET_S='' RAW_DELETE_S='' RAW_GOT='' RAW_SHARD_GOT='' t='' PEAK_KIB=''
LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
BUSY_BEFORE=$(machine_busy_ticks) OWN_BEFORE=$(own_ticks) WALL_BEFORE=$(date +%s)
RAW_S3_S='' RAW_S3_TIMES=() RAW_S3_CPU=() COL_CPU=() SHARD_CPU=() CPU=''
RAW_TIMES=() RAW_CREATE_TIMES=() RAW_GET_TIMES=() RAW_DELETE_TIMES=()
SHARD_RAW_TIMES=()
COL_TIMES=() COL_PEAKS_KIB=() COL_IDS=()
SHARD_TIMES=() SHARD_PEAKS_KIB=() SHARD_IDS=()
RESTORE_TIMES=() RESTORE_PEAKS_KIB=()
for i in $(seq 1 "$REPEAT"); do
  if ((i > 1)); then
    stop_garage
    rm -rf "$TMP_DIR/garage/meta" "$TMP_DIR/garage/data"
    start_garage
  fi
  sync
  raw_snapshot_transfer "$i"
  RAW_CREATE_TIMES+=("$RAW_CREATE_S") RAW_GET_TIMES+=("$RAW_GET_S") RAW_DELETE_TIMES+=("$RAW_DELETE_S")
  RAW_TIMES+=("$(add "$RAW_CREATE_S" "$RAW_GET_S" "$RAW_DELETE_S")")
  log "run $i/$REPEAT (d) raw snapshot: ${RAW_TIMES[-1]}s (create ${RAW_CREATE_S}s, GET ${RAW_GET_S}s, delete ${RAW_DELETE_S}s, $RAW_GOT bytes)"

  sync
  CPU=$(cpu_now)
  timed RAW_S3_S raw_snapshot_to_s3 "$i"
  CPU=$(cpu_since "$CPU")
  RAW_S3_TIMES+=("$RAW_S3_S") RAW_S3_CPU+=("$CPU")
  log "run $i/$REPEAT (f) raw snapshot → Garage: ${RAW_S3_S}s, CPU s (agent garage double) $CPU"

  agent_step "backup-col-$i.json" -o json backup qdrant --collection "$COLLECTION"
  COL_TIMES+=("$t") COL_PEAKS_KIB+=("$PEAK_KIB") COL_IDS+=("$(manifest_id "backup-col-$i.json")") COL_CPU+=("$CPU")
  log "run $i/$REPEAT (a) kubectl-soma backup qdrant: ${t}s, agent VmHWM $(kib_mib "${COL_PEAKS_KIB[-1]}") MiB, CPU s (agent garage double) $CPU"

  sync
  timed t raw_shard_stream || die "streaming the shard snapshot failed"
  SHARD_RAW_TIMES+=("$t")
  log "run $i/$REPEAT (e) raw shard stream: ${t}s, $RAW_SHARD_GOT bytes"

  agent_step "backup-shard-$i.json" -o json backup qdrant --collection "$COLLECTION" --stream-shards
  SHARD_TIMES+=("$t") SHARD_PEAKS_KIB+=("$PEAK_KIB") SHARD_IDS+=("$(manifest_id "backup-shard-$i.json")") SHARD_CPU+=("$CPU")
  log "run $i/$REPEAT (b) kubectl-soma backup qdrant --stream-shards: ${t}s, agent VmHWM $(kib_mib "${SHARD_PEAKS_KIB[-1]}") MiB, CPU s (agent garage double) $CPU"

  q DELETE "/collections/$COPY" >/dev/null || die "deleting collection $COPY failed"
  agent_step "restore-$i.out" restore "${COL_IDS[-1]}" --collection "$COLLECTION" --as "$COPY"
  RESTORE_TIMES+=("$t") RESTORE_PEAKS_KIB+=("$PEAK_KIB")
  log "run $i/$REPEAT (c) kubectl-soma restore --as $COPY: ${t}s, agent VmHWM $(kib_mib "${RESTORE_PEAKS_KIB[-1]}") MiB"
done
FINAL_HWM_KIB=$(proc_kib VmHWM)
LOAD_AFTER=$(cut -d ' ' -f 1-3 /proc/loadavg)
BUSY_S=$(ticks_s "$(($(machine_busy_ticks) - BUSY_BEFORE))")
OWN_S=$(ticks_s "$(($(own_ticks) - OWN_BEFORE))")
WALL_S=$(($(date +%s) - WALL_BEFORE))
OTHERS_S=$((BUSY_S > OWN_S ? BUSY_S - OWN_S : 0))

# --- checks --------------------------------------------------------------------------------------
COL_MANIFEST="$TMP_DIR/backup-col-$REPEAT.json"
SHARD_MANIFEST="$TMP_DIR/backup-shard-$REPEAT.json"
COL_RAW=$(json_field "$COL_MANIFEST" raw_bytes) || die "no \"raw_bytes\" in the manifest: $(head -c 600 "$COL_MANIFEST")"
COL_STORED=$(json_field "$COL_MANIFEST" stored_bytes) || die "no \"stored_bytes\" in the manifest"
SHARD_RAW=$(json_field "$SHARD_MANIFEST" raw_bytes) || die "no \"raw_bytes\" in the manifest: $(head -c 600 "$SHARD_MANIFEST")"
SHARD_STORED=$(json_field "$SHARD_MANIFEST" stored_bytes) || die "no \"stored_bytes\" in the manifest"
COL_KIND=$(json_field "$COL_MANIFEST" kind 2>/dev/null || echo "?")
SHARD_KIND=$(json_field "$SHARD_MANIFEST" kind 2>/dev/null || echo "?")
[[ "$COL_RAW" == "$RAW_GOT" ]] || log "WARNING: the collection backup holds $COL_RAW bytes, the raw snapshot download $RAW_GOT"
[[ "$SHARD_RAW" == "$RAW_SHARD_GOT" ]] || log "WARNING: the shard backup holds $SHARD_RAW bytes, the raw shard stream $RAW_SHARD_GOT"
log "collection backup ${COL_IDS[-1]} ($COL_KIND): raw $COL_RAW, stored $COL_STORED bytes; shard backup ${SHARD_IDS[-1]} ($SHARD_KIND): raw $SHARD_RAW, stored $SHARD_STORED bytes"

# The copy must be the collection: same points and vector parameters (its bytes were checked on
# the way in: Qdrant's upload compares the sha256 the agent sends with the file it received).
q GET "/collections/$COPY" >"$TMP_DIR/copy.json" || die "GET /collections/$COPY failed"
COPY_POINTS=$(json_field "$TMP_DIR/copy.json" result.points_count || echo "?")
COPY_VECTORS=$(json_field "$TMP_DIR/copy.json" result.config.params.vectors || echo "?")
if [[ "$COPY_POINTS" == "$POINTS" && "$COPY_VECTORS" == "$VECTORS" ]]; then
  RESTORE_CHECK="\`$COPY\` has the same points_count ($POINTS) and vector params ($VECTORS) as \`$COLLECTION\`; Qdrant's upload checked the snapshot's sha256"
else
  RESTORE_CHECK="DIFFERENT: \`$COLLECTION\` $POINTS points $VECTORS, \`$COPY\` $COPY_POINTS points $COPY_VECTORS"
fi
# Nothing may stay on the node: the double lists the snapshot files left when it stops.
stop_double
LEFT_ON_NODE=$(sed -n 's/^left on the node: //p' "$TMP_DIR/qdrant.log" | head -n 1)
LEFT_ON_NODE=${LEFT_ON_NODE:-"(not reported)"}
log "restore: $RESTORE_CHECK; snapshot files left on the node: $LEFT_ON_NODE"

# --- results -----------------------------------------------------------------------------------
RAW_MED=$(median "${RAW_TIMES[@]}")
SHARD_RAW_MED=$(median "${SHARD_RAW_TIMES[@]}")
COL_MED=$(median "${COL_TIMES[@]}")
SHARD_MED=$(median "${SHARD_TIMES[@]}")
RESTORE_MED=$(median "${RESTORE_TIMES[@]}")
MAX_PEAK_KIB=$(max_kib "${COL_PEAKS_KIB[@]}" "${SHARD_PEAKS_KIB[@]}" "${RESTORE_PEAKS_KIB[@]}" "$FINAL_HWM_KIB")
collect_run_info
KNOBS="SIZE_MIB=$SIZE_MIB REPEAT=$REPEAT$(agent_knobs)"
row() { # row STEP COMMAND BYTES PEAK_KIB|'' TIMES...
  local step=$1 what=$2 bytes=$3 peak=$4 med
  shift 4
  med=$(median "$@")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$step" "$what" "$(join_by ', ' "$@")" "$med" "$(mib_per_s "$bytes" "$med")" \
    "${peak:+$(kib_mib "$peak") MiB}"
}

log "done; results follow on stdout"
cat <<EOF

### Qdrant snapshot streaming to S3 vs a raw snapshot download — $(date -u '+%Y-%m-%d %H:%M UTC')

$(machine_line)
$(load_line "$LOAD_BEFORE" "$LOAD_AFTER")
- **CPU while measuring**: ${WALL_S} s wall × $(nproc) CPUs; busy $BUSY_S CPU-s, of which this benchmark's processes (agent, Garage, double, curl, kubectl-soma) $OWN_S and **other processes $OTHERS_S** (kernel threads writing back this benchmark's files count as other)
- **Versions**: Qdrant REST **test double** reporting $QDRANT_VERSION (\`soma-tests\` example \`qdrant-double\`), $GARAGE_VERSION (single node, 127.0.0.1, \`compression_level = "none"\`), ${AGENT_VERSION:-soma-agent (no --version)} at $GIT_REV, $RUSTC_VERSION, $(curl --version | head -n 1 | cut -d ' ' -f 1-2)
- **Command**: \`$KNOBS bench/qdrant_snapshot.sh\`
- **Agent**: \`soma-agent ${AGENT_ARGS[*]}\` (release build; S3 via \`AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT\`, \`AWS_REGION=us-east-1\`)
- **Data**: collection \`$COLLECTION\`, $SIZE_MIB MiB of incompressible pseudo-random bytes (AES keystream), $POINTS points reported, vectors $VECTORS; collection snapshot $RAW_GOT bytes ($(mib "$RAW_GOT") MiB), shard archive $RAW_SHARD_GOT bytes
- **Server**: the Qdrant side is a test double of the Qdrant 1.18 REST API, not Qdrant: it generates its data on the fly and packs its own archive layout, so creating and serving a snapshot costs something else than on a real Qdrant node. The absolute numbers measure the agent's streaming path (download → zstd → sha256 → multipart upload, and back), with the raw transfers (d) and (e) from the same double as the yardstick; they do not measure Qdrant.

| step | command | runs (s) | median (s) | MiB/s of raw bytes | agent VmHWM |
|---|---|---|---|---|---|
$(row "(d) raw snapshot transfer" "curl: \`POST /collections/$COLLECTION/snapshots?wait=true\`, \`GET\` it > /dev/null, \`DELETE\` it" "$RAW_GOT" '' "${RAW_TIMES[@]}")
$(row "(f) raw snapshot transfer into Garage" "curl: as (d), the \`GET\` piped into one \`PUT\` to Garage (unsigned payload)" "$RAW_GOT" '' "${RAW_S3_TIMES[@]}")
$(row "(a) soma backup, collection mode → S3" "\`kubectl-soma backup qdrant --collection $COLLECTION\`" "$COL_RAW" "$(max_kib "${COL_PEAKS_KIB[@]}")" "${COL_TIMES[@]}")
$(row "(e) raw shard stream" "curl: \`GET /collections/$COLLECTION/shards/0/snapshot\` > /dev/null" "$RAW_SHARD_GOT" '' "${SHARD_RAW_TIMES[@]}")
$(row "(b) soma backup, shard stream → S3" "\`kubectl-soma backup qdrant --collection $COLLECTION --stream-shards\`" "$SHARD_RAW" "$(max_kib "${SHARD_PEAKS_KIB[@]}")" "${SHARD_TIMES[@]}")
$(row "(c) soma restore ← S3" "\`kubectl-soma restore <id of (a)> --collection $COLLECTION --as $COPY\`" "$COL_RAW" "$(max_kib "${RESTORE_PEAKS_KIB[@]}")" "${RESTORE_TIMES[@]}")

- **Agent / raw transfer** (medians): collection mode (a)/(d) **$(ratio "$COL_MED" "$RAW_MED")×** ($COL_MED s vs $RAW_MED s), against the raw transfer into Garage (a)/(f) **$(ratio "$COL_MED" "$(median "${RAW_S3_TIMES[@]}")")×**; shard stream (b)/(e) **$(ratio "$SHARD_MED" "$SHARD_RAW_MED")×** ($SHARD_MED s vs $SHARD_RAW_MED s); restore (c) vs the raw snapshot download alone: $(ratio "$RESTORE_MED" "$(median "${RAW_GET_TIMES[@]}")")×
- **CPU seconds per step** (agent / Garage / double, each run): (f) $(join_by ', ' "${RAW_S3_CPU[@]}"); (a) $(join_by ', ' "${COL_CPU[@]}"); (b) $(join_by ', ' "${SHARD_CPU[@]}")
- **Raw snapshot transfer split** (medians): create on the node $(median "${RAW_CREATE_TIMES[@]}") s, GET $(median "${RAW_GET_TIMES[@]}") s ($(mib_per_s "$RAW_GOT" "$(median "${RAW_GET_TIMES[@]}")") MiB/s), DELETE $(median "${RAW_DELETE_TIMES[@]}") s
- **Backup size** (manifests of \`${COL_IDS[-1]}\`, $COL_KIND, and \`${SHARD_IDS[-1]}\`, $SHARD_KIND): raw_bytes $COL_RAW / $SHARD_RAW, stored_bytes $COL_STORED / $SHARD_STORED ($(ratio "$COL_RAW" "$COL_STORED")× / $(ratio "$SHARD_RAW" "$SHARD_STORED")× smaller; the data is incompressible)
- **Agent memory**: idle RSS $(kib_mib "$IDLE_RSS_KIB") MiB; peak RSS per run: collection backup $(peaks_mib "${COL_PEAKS_KIB[@]}")MiB, shard-stream backup $(peaks_mib "${SHARD_PEAKS_KIB[@]}")MiB, restore $(peaks_mib "${RESTORE_PEAKS_KIB[@]}")MiB; highest peak of the run $(kib_mib "$MAX_PEAK_KIB") MiB ($PEAK_NOTE)
- **Restore check**: $RESTORE_CHECK
- **Left on the node** (snapshot files the double still held when it stopped): $LEFT_ON_NODE
EOF
