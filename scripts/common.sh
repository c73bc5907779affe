# shellcheck shell=bash
# Helpers shared by scripts/demo.sh and the benchmarks in bench/: sourced, never run on its own.

# The newest PostgreSQL bin directory (PG_BIN overrides).
find_pg_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then
    printf '%s\n' "$PG_BIN"
    return
  fi
  local dir
  dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$dir" ]] && command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir)
  fi
  if [[ -z "$dir" ]] && command -v initdb >/dev/null 2>&1; then
    dir=$(dirname "$(command -v initdb)")
  fi
  printf '%s\n' "$dir"
}

# A TCP port on 127.0.0.1 that nothing listens on right now.
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
