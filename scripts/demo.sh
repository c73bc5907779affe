#!/usr/bin/env bash
# Soma Backup: one-command local demo.
#
# Builds soma-agent and kubectl-soma, starts a throwaway PostgreSQL on 127.0.0.1, fills a small
# database `appdb`, backs it up through the agent into a local file store, verifies the backup,
# restores it as `appdb_restored` and proves the copy equals the original (schema and every row).
# Everything lives in one temporary directory that is removed on exit, success or failure.
#
# Needs: cargo, and the PostgreSQL server binaries (Debian: `apt-get install postgresql-15`; the
# cluster it would auto-create may stay stopped). Run as a normal user, or as root: the server then
# runs as the unprivileged `postgres` user.
#
# Environment:
#   PG_BIN=DIR          PostgreSQL binaries (default: newest /usr/lib/postgresql/*/bin)
#   SOMA_SKIP_BUILD=1   use already-built binaries instead of running cargo
#   SOMA_BIN_DIR=DIR    where soma-agent and kubectl-soma are (default: target/release)
#   KEEP_TMP=1          keep the temporary directory (data, logs) for a look afterwards
#   NO_COLOR=1          plain output
set -Eeuo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/common.sh
. "$REPO_ROOT/scripts/common.sh"
SOURCE_DB=appdb
RESTORED_DB=appdb_restored
TOTAL_STEPS=8

# The demo talks to its own server only: ignore any libpq settings of the calling shell.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE

# ---------------------------------------------------------------------------------------------
# Output

if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then
  BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' BLUE=$'\e[34m' RESET=$'\e[0m'
else
  BOLD='' DIM='' RED='' GREEN='' BLUE='' RESET=''
fi

STEP=0
CURRENT_STEP="start-up"
step() {
  STEP=$((STEP + 1))
  CURRENT_STEP="$*"
  printf '\n%s%s[%d/%d] %s%s\n' "$BOLD" "$BLUE" "$STEP" "$TOTAL_STEPS" "$*" "$RESET"
}
info() { printf '      %s\n' "$*"; }
ok() { printf '      %s✓%s %s\n' "$GREEN" "$RESET" "$*"; }
die() {
  printf '\n%serror:%s %s\n' "$RED$BOLD" "$RESET" "$*" >&2
  exit 1
}

# Shows a command the way a user would type it, runs it and indents what it prints.
run() {
  printf '      %s$ %s%s\n' "$DIM" "$*" "$RESET"
  local rc=0
  "$@" 2>&1 | sed 's/^/        /' || rc=$?
  # With pipefail the pipeline's status is the command's (sed does not fail).
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Clean-up: runs on every exit, including failures and Ctrl-C.

TMP_DIR=''
PG_DATA=''
PG_STARTED=0
AGENT_PID=''
RESULT_PRINTED=0

as_postgres() { "$@"; } # redefined below when running as root

# shellcheck disable=SC2317 # called from the EXIT trap
show_log_tail() {
  local name=$1 file=$2
  [[ -s "$file" ]] || return 0
  printf '\n%s--- last lines of the %s log (%s) ---%s\n' "$DIM" "$name" "$file" "$RESET" >&2
  tail -n 25 "$file" >&2
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$?
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
  trap - ERR
  if [[ $rc -ne 0 && $RESULT_PRINTED -eq 0 ]]; then
    if [[ -n "$TMP_DIR" ]]; then
      show_log_tail "soma-agent" "$TMP_DIR/agent.log"
      show_log_tail "PostgreSQL" "$TMP_DIR/pg/postgres.log"
    fi
    printf '\n%s%sFAIL%s  the demo stopped during: %s (exit code %d)\n' "$RED" "$BOLD" "$RESET" "$CURRENT_STEP" "$rc" >&2
  fi
  if [[ -n "$AGENT_PID" ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null
    for _ in $(seq 1 50); do
      kill -0 "$AGENT_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
  fi
  if [[ $PG_STARTED -eq 1 ]]; then
    (cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1)
  fi
  if [[ -n "$TMP_DIR" && -d "$TMP_DIR" ]]; then
    if [[ -n "${KEEP_TMP:-}" ]]; then
      printf '%sKept %s (KEEP_TMP is set).%s\n' "$DIM" "$TMP_DIR" "$RESET" >&2
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



# psql against the demo server, failing on the first error.
sql() {
  local db=$1
  shift
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}
# One value (or tab-separated row) per line.
sql_value() {
  local db=$1
  shift
  sql "$db" -At -F $'\t' "$@"
}

# Schema as pg_dump sees it, without comments and the per-run \restrict keys of newer pg_dump.
schema_of() {
  "$PG_BIN/pg_dump" --schema-only -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" |
    grep -Ev '^(--|\\(un)?restrict )' | sed '/^$/d'
}

# ---------------------------------------------------------------------------------------------

printf '%sSoma Backup — local demo%s\n' "$BOLD" "$RESET"
printf '%sback up a PostgreSQL database, verify it, restore it, and prove the copy is identical%s\n' "$DIM" "$RESET"

step "Checking prerequisites"
PG_BIN=$(find_pg_bin)
for tool in initdb pg_ctl postgres psql pg_dump; do
  [[ -x "$PG_BIN/$tool" ]] ||
    die "PostgreSQL binaries not found (looked for $tool in '${PG_BIN:-/usr/lib/postgresql/*/bin}'). On Debian: apt-get install postgresql-15, or set PG_BIN."
done
PG_VERSION=$("$PG_BIN/postgres" --version)
ok "$PG_VERSION ($PG_BIN)"
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 ||
    die "running as root, and PostgreSQL refuses to run as root: create an unprivileged 'postgres' user or run the demo as a normal user."
  if command -v runuser >/dev/null 2>&1; then
    as_postgres() { runuser -u postgres -- "$@"; }
  else
    as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
  fi
  ok "running as root: the PostgreSQL server will run as the 'postgres' user"
fi
if [[ -z "${SOMA_SKIP_BUILD:-}" ]]; then
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) or set SOMA_SKIP_BUILD=1 with SOMA_BIN_DIR."
  ok "$(cargo --version)"
fi
# pg_dump / pg_restore used by the agent come from the same PostgreSQL as the server.
export PATH="$PG_BIN:$PATH"

step "Building soma-agent and kubectl-soma (release)"
BIN_DIR=${SOMA_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}
if [[ -z "${SOMA_SKIP_BUILD:-}" ]]; then
  info "the first build compiles all dependencies and takes a few minutes"
  (cd "$REPO_ROOT" && cargo build --release --bins -p soma-agent -p kubectl-soma)
else
  info "SOMA_SKIP_BUILD is set: using the binaries in $BIN_DIR"
fi
for bin in soma-agent kubectl-soma; do
  [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin is missing"
done
export PATH="$BIN_DIR:$PATH"
ok "binaries in $BIN_DIR"

step "Starting a throwaway PostgreSQL on 127.0.0.1"
TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/soma-demo.XXXXXX")
chmod 755 "$TMP_DIR" # the server's user must reach its directory inside
mkdir "$TMP_DIR/pg"
[[ $(id -u) -eq 0 ]] && chown postgres: "$TMP_DIR/pg"
PG_DATA="$TMP_DIR/pg/data"
PG_PORT=$(free_port) || die "no free TCP port found on 127.0.0.1"
info "working directory: $TMP_DIR"
(cd / && as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync) \
  >"$TMP_DIR/initdb.log" 2>&1 || {
  cat "$TMP_DIR/initdb.log" >&2
  die "initdb failed"
}
cat >>"$PG_DATA/postgresql.conf" <<EOF

# soma demo: a private server on loopback only
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP_DIR/pg'
EOF
(cd / && as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP_DIR/pg/postgres.log" -w -t 60 start) >/dev/null
PG_STARTED=1
ok "PostgreSQL listening on 127.0.0.1:$PG_PORT (superuser 'postgres', trust auth, data in $PG_DATA)"

step "Creating database '$SOURCE_DB' with some data"
sql postgres -c "CREATE DATABASE $SOURCE_DB"
sql "$SOURCE_DB" <<'SQL'
CREATE SEQUENCE invoice_no_seq START 100000;

CREATE TABLE customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    full_name   text NOT NULL,
    country     char(2) NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE products (
    id          serial PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    price       numeric(10,2) NOT NULL CHECK (price >= 0),
    attributes  jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    invoice_no  bigint NOT NULL UNIQUE DEFAULT nextval('invoice_no_seq'),
    status      text NOT NULL CHECK (status IN ('new', 'paid', 'shipped', 'cancelled')),
    note        text,
    ordered_at  timestamptz NOT NULL
);
COMMENT ON TABLE orders IS 'One row per checkout';

CREATE TABLE order_items (
    order_id    bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line_no     int NOT NULL,
    product_id  int NOT NULL REFERENCES products (id),
    quantity    int NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

CREATE INDEX orders_customer_recent_idx ON orders (customer_id, ordered_at DESC);

CREATE VIEW order_totals AS
SELECT o.id AS order_id, o.customer_id, o.status, sum(i.quantity * i.unit_price) AS total
FROM orders o JOIN order_items i ON i.order_id = o.id
GROUP BY o.id;

-- Deterministic data: a re-run of the demo produces the same rows.
INSERT INTO customers (email, full_name, country, created_at)
SELECT format('user%s@example.com', g),
       CASE WHEN g % 7 = 0 THEN format('Zoë Ångström-Núñez %s', g) ELSE format('Customer %s', g) END,
       (ARRAY['DE', 'FR', 'US', 'JP', 'BR'])[1 + g % 5],
       timestamptz '2024-01-01 00:00:00+00' + g * interval '37 minutes'
FROM generate_series(1, 1000) AS g;

INSERT INTO products (sku, name, price, attributes)
SELECT format('SKU-%s', lpad(g::text, 5, '0')),
       format('Product %s', g),
       round((g * 3.17)::numeric % 500 + 0.99, 2),
       jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[1 + g % 3], 'weight_g', g * 10,
                          'tags', jsonb_build_array('demo', format('batch-%s', g % 4)))
FROM generate_series(1, 200) AS g;

INSERT INTO orders (customer_id, status, note, ordered_at)
SELECT 1 + (g * 7919) % 1000,
       (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + g % 4],
       CASE WHEN g % 10 = 0 THEN format('gift wrap, note #%s: "thanks!"', g) END,
       timestamptz '2024-06-01 00:00:00+00' + g * interval '13 minutes'
FROM generate_series(1, 3000) AS g;

INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price)
SELECT o.id, l, p.id, 1 + (o.id + l) % 5, p.price
FROM orders o
CROSS JOIN LATERAL generate_series(1, 1 + o.id::int % 3) AS l
JOIN products p ON p.id = 1 + (o.id::int * 31 + l * 17) % 200;

ANALYZE;
SQL
while IFS=$'\t' read -r name rows; do
  info "$(printf '%-22s %6s rows' "$name" "$rows")"
done < <(sql_value "$SOURCE_DB" <<'SQL'
SELECT 'customers', count(*) FROM customers UNION ALL
SELECT 'products', count(*) FROM products UNION ALL
SELECT 'orders', count(*) FROM orders UNION ALL
SELECT 'order_items', count(*) FROM order_items UNION ALL
SELECT 'order_totals (view)', count(*) FROM order_totals;
SQL
)
ok "schema: 4 tables, 1 view, 1 extra index, 1 sequence (+3 owned by columns), foreign keys, checks, jsonb"

step "Starting soma-agent with a local file store"
STORE_URL="file://$TMP_DIR/store"
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$SOURCE_DB"
printf '      %s$ soma-agent --listen 127.0.0.1:0 --store %s --postgres-url %s &%s\n' "$DIM" "$STORE_URL" "$PG_URL" "$RESET"
soma-agent --listen 127.0.0.1:0 --store "$STORE_URL" --postgres-url "$PG_URL" >"$TMP_DIR/agent.log" 2>&1 &
AGENT_PID=$!
AGENT_ADDR=''
for _ in $(seq 1 300); do
  AGENT_ADDR=$(sed -n 's/.*soma-agent listening on \(127\.0\.0\.1:[0-9][0-9]*\).*/\1/p' "$TMP_DIR/agent.log" | head -n 1)
  [[ -n "$AGENT_ADDR" ]] && break
  kill -0 "$AGENT_PID" 2>/dev/null || die "soma-agent exited before it was ready"
  sleep 0.1
done
[[ -n "$AGENT_ADDR" ]] || die "soma-agent did not print 'soma-agent listening on …' within 30 s"
ok "agent listening on $AGENT_ADDR (pid $AGENT_PID), backups go to $TMP_DIR/store"
info "tip: with kubectl-soma on your PATH, every command below also runs as 'kubectl soma …'"

step "Backing up, listing and verifying"
run kubectl-soma --agent "$AGENT_ADDR" backup postgres --database "$SOURCE_DB"
echo
run kubectl-soma --agent "$AGENT_ADDR" list
echo
run kubectl-soma --agent "$AGENT_ADDR" verify latest

step "Restoring the latest backup into '$RESTORED_DB'"
run kubectl-soma --agent "$AGENT_ADDR" restore latest --database "$RESTORED_DB"

step "Comparing '$RESTORED_DB' with '$SOURCE_DB'"
FAILURES=0

schema_of "$SOURCE_DB" >"$TMP_DIR/schema.$SOURCE_DB.sql"
schema_of "$RESTORED_DB" >"$TMP_DIR/schema.$RESTORED_DB.sql"
if diff -u "$TMP_DIR/schema.$SOURCE_DB.sql" "$TMP_DIR/schema.$RESTORED_DB.sql" >"$TMP_DIR/schema.diff"; then
  ok "schema identical (pg_dump --schema-only, $(wc -l <"$TMP_DIR/schema.$SOURCE_DB.sql") lines)"
else
  printf '      %s✗%s schema differs (pg_dump --schema-only):\n' "$RED" "$RESET"
  sed 's/^/        /' "$TMP_DIR/schema.diff" | head -n 60
  FAILURES=$((FAILURES + 1))
fi

# Every table, view and materialized view outside the system schemas, from the original.
mapfile -t RELATIONS < <(sql_value "$SOURCE_DB" -c "
  SELECT format('%I.%I', n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  ORDER BY 1")
# Rows in a fixed order (by their text form), hashed: equal hashes mean equal contents.
relation_digest() {
  sql_value "$1" -c "SELECT count(*), md5(coalesce(string_agg(t::text, E'\n' ORDER BY t::text), '')) FROM $2 AS t"
}
printf '      %-26s %8s  %-32s  %s\n' "table / view" "rows" "md5 of ordered rows" "restored"
TOTAL_ROWS=0
for rel in "${RELATIONS[@]}"; do
  IFS=$'\t' read -r src_rows src_md5 < <(relation_digest "$SOURCE_DB" "$rel")
  dst=$(relation_digest "$RESTORED_DB" "$rel" 2>/dev/null) || dst=$'missing\t-'
  IFS=$'\t' read -r dst_rows dst_md5 <<<"$dst"
  if [[ "$src_rows" == "$dst_rows" && "$src_md5" == "$dst_md5" ]]; then
    mark="${GREEN}✓ same${RESET}"
  else
    mark="${RED}✗ differs: $dst_rows rows, $dst_md5${RESET}"
    FAILURES=$((FAILURES + 1))
  fi
  printf '      %-26s %8s  %-32s  %s\n' "$rel" "$src_rows" "$src_md5" "$mark"
  TOTAL_ROWS=$((TOTAL_ROWS + src_rows))
done

SEQ_QUERY="SELECT schemaname, sequencename, last_value FROM pg_sequences ORDER BY 1, 2"
if [[ "$(sql_value "$SOURCE_DB" -c "$SEQ_QUERY")" == "$(sql_value "$RESTORED_DB" -c "$SEQ_QUERY")" ]]; then
  ok "sequences continue where they were ($(sql_value "$SOURCE_DB" -c "SELECT count(*) FROM pg_sequences") sequences, same last_value)"
else
  printf '      %s✗%s sequence values differ\n' "$RED" "$RESET"
  FAILURES=$((FAILURES + 1))
fi

RESULT_PRINTED=1
if [[ $FAILURES -eq 0 ]]; then
  printf '\n%s%sPASS%s  %s is identical to %s: schema, sequences and all %d tables/views (%d rows compared).\n' \
    "$GREEN" "$BOLD" "$RESET" "$RESTORED_DB" "$SOURCE_DB" "${#RELATIONS[@]}" "$TOTAL_ROWS"
  info "Next: read the agent's flags with 'soma-agent --help' and point --store at s3://bucket/prefix."
  exit 0
fi
printf '\n%s%sFAIL%s  %s differs from %s in %d check(s) (see above).\n' \
  "$RED" "$BOLD" "$RESET" "$RESTORED_DB" "$SOURCE_DB" "$FAILURES" >&2
exit 1
