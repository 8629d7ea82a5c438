#!/usr/bin/env bash
# Where one wake-up's time goes at a dashboard's load: single-row INSERT commits at a
# fixed rate (pgbench -R, 2 clients) into the watched citas, the real daemon (release,
# default config) with one WebSocket subscriber on the written tenant. Prints:
#   - per statement (pg_stat_statements, track = all): calls and mean execution time of
#     the daemon's move-and-read statement, the move inside it, and the app's INSERT;
#   - the daemon process's CPU per committed row (utime and stime from /proc);
#   - the daemon's own stage clocks (/metrics, means over the run): the move-and-read
#     statement's round trip, a notification's arrival to its events handed to
#     delivery, and a row's creation to that hand-off;
#   - with perf installed, the share of the daemon's samples in the kernel and in
#     context switches (perf record -g, 2 000 Hz).
#   cargo build --release --bin citapulse
#   bench/variants/wakeup-profile.sh              # RATE=1000 SECS=10
#   PHASES=1 SECS=5 bench/variants/wakeup-profile.sh
#   BACKEND_PERF=1 bench/variants/wakeup-profile.sh
# PHASES=1 also logs every statement's protocol phases (log_min_duration_statement = 0)
# and prints the percentiles of the reader statement's bind and execute times; the
# logging slows everything else, so take the other figures from a run without it.
# BACKEND_PERF=1 samples the reader's PostgreSQL backend (citapulse-listener) instead of
# the daemon, and prints where its time goes: its top functions, self and inclusive (the
# backend's own symbols only: the server binary is stripped of static ones).
# Env: RATE, SECS, SUBSCRIBERS (1), DAEMON_BIN (default target/release/citapulse), PGBIN, KEEP=1,
#      DAEMON_URL_PARAMS (added to the daemon's database URL, e.g.
#      options=-c%20synchronous_commit%3Doff).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); proj=$(cd "$here/../.." && pwd)
RATE=${RATE:-1000} SECS=${SECS:-10}
DAEMON_BIN=${DAEMON_BIN:-${CARGO_TARGET_DIR:-$proj/target}/release/citapulse}
pgbin=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$DAEMON_BIN" ] || { echo "no daemon at $DAEMON_BIN: cargo build --release --bin citapulse" >&2; exit 1; }
work=$(mktemp -d); chmod 777 "$work"; port=$((30000 + RANDOM % 10000)); wsport=$((port + 1))
asp() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
daemon="" sub="" perf_pid=""
cleanup() {
  [ -n "$perf_pid" ] && kill "$perf_pid" 2>/dev/null || true
  [ -n "$sub" ] && kill "$sub" 2>/dev/null || true
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
  asp "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  [ "${KEEP:-0}" = 1 ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
asp "$pgbin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
CONF
if [ "${PHASES:-0}" = 1 ]; then
  printf "log_min_duration_statement = 0\nlog_line_prefix = '%%a|'\n" >> "$work/data/postgresql.conf"
fi
asp "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
url="postgresql://postgres@127.0.0.1:$port/postgres"
psql() { "$pgbin/psql" -X -v ON_ERROR_STOP=1 "$@"; }
psql -q "$url" -c "CREATE EXTENSION pg_stat_statements" >/dev/null
psql -q "$url" -f "$proj/sql/install.sql" >/dev/null 2>"$work/install.err" || { cat "$work/install.err" >&2; exit 1; }
psql -q "$url" -f "$proj/sql/example_schema.sql" >/dev/null 2>"$work/example.err" || { cat "$work/example.err" >&2; exit 1; }
export DATABASE_URL=$url JWT_SECRET=wakeup-profile-secret-0123456789abcdef
DATABASE_URL="$url${DAEMON_URL_PARAMS:+?$DAEMON_URL_PARAMS}" \
  CITAPULSE_LISTEN=127.0.0.1:$wsport CITAPULSE_LOG__LEVEL=warn "$DAEMON_BIN" serve >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$wsport/health" >/dev/null && break; sleep 0.2; done
curl -sf "127.0.0.1:$wsport/health" >/dev/null || { echo "the daemon did not come up:" >&2; cat "$work/daemon.log" >&2; exit 1; }
token=$("$DAEMON_BIN" token --tenant t1 | tail -1)
cat > "$work/sub.js" <<JS
const WebSocket = require("$proj/bench/peers/node/node_modules/ws");
for (let i = 0; i < ${SUBSCRIBERS:-1}; i++) {
  const ws = new WebSocket("ws://127.0.0.1:$wsport/ws", {headers: {Authorization: "Bearer $token"}});
  ws.on("open", () => ws.send(JSON.stringify({type: "subscribe", data: {channel: "estadisticas:t1"}})));
  ws.on("message", () => {});
}
JS
node "$work/sub.js" & sub=$!
sleep 1
subscribers=$(curl -s "127.0.0.1:$wsport/metrics" | awk '/^citapulse_subscriptions[{ ]/ {print $2}')
[ "${subscribers:-0}" = "${SUBSCRIBERS:-1}" ] || { echo "the subscribers did not subscribe (node and bench/peers/node/node_modules needed)" >&2; exit 1; }
echo "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
VALUES ('t1', 'c', 'p1', current_date, '09:00', '09:30', 'pendiente');" > "$work/ins.sql"
psql -q "$url" -c "SELECT pg_stat_statements_reset()" >/dev/null
cpu() { awk '{print $14, $15}' "/proc/$daemon/stat"; }
read -r u0 s0 < <(cpu)
perf_target=$daemon
if [ "${BACKEND_PERF:-0}" = 1 ]; then
  perf_target=$(psql -qtA "$url" -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'citapulse-listener'")
  [ -n "$perf_target" ] || { echo "no citapulse-listener backend" >&2; exit 1; }
fi
if command -v perf >/dev/null; then
  perf record -q -F 2000 -g -p "$perf_target" -o "$work/perf.data" -- sleep "$SECS" >/dev/null 2>&1 &
  perf_pid=$!
fi
commits=$("$pgbin/pgbench" -n -f "$work/ins.sql" -c 2 -R "$RATE" -T "$SECS" "$url" 2>"$work/pgbench.err" \
  | awk '/number of transactions actually processed/ {print $NF}')
[ -n "$commits" ] && [ "$commits" -gt 0 ] || { echo "pgbench failed:" >&2; cat "$work/pgbench.err" >&2; exit 1; }
read -r u1 s1 < <(cpu)
tck=$(getconf CLK_TCK)
echo "commits: $commits at $RATE/s for $SECS s"
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$commits" -v t="$tck" \
  'BEGIN { printf "daemon CPU per committed row: %.1f us (user %.1f, system %.1f)\n", (u+s)/t/n*1e6, u/t/n*1e6, s/t/n*1e6 }'
curl -s "127.0.0.1:$wsport/metrics" | awk '
  /^citapulse_(log_read|wakeup_to_queued|delivery_lag)_seconds_(sum|count)/ {
    split($1, k, "{"); v[k[1]] = $2 }
  END { n = split("log_read wakeup_to_queued delivery_lag", names, " ")
        for (i = 1; i <= n; i++) { b = "citapulse_" names[i] "_seconds"
          if (v[b "_count"] > 0) printf "daemon clock, mean %s: %.3f ms over %d\n", names[i], v[b "_sum"] / v[b "_count"] * 1000, v[b "_count"] } }'
psql -q "$url" -c "SELECT calls, round(mean_exec_time::numeric, 3) AS mean_ms,
    CASE WHEN query LIKE 'WITH want AS MATERIALIZED%' THEN 'daemon: move-and-read statement'
         WHEN query LIKE 'WITH moved AS (%DELETE FROM citapulse.inbox%' THEN '  of which the move (take_inbox)'
         WHEN query LIKE 'INSERT INTO citas %' THEN 'app: INSERT INTO citas (trigger included)'
         WHEN query LIKE 'INSERT INTO citapulse.inbox%' THEN '  of which the trigger''s inbox INSERT' END AS statement
  FROM pg_stat_statements
 WHERE query LIKE 'WITH want AS MATERIALIZED%' OR query LIKE 'WITH moved AS (%DELETE FROM citapulse.inbox%'
    OR query LIKE 'INSERT INTO citas %' OR query LIKE 'INSERT INTO citapulse.inbox%'
 ORDER BY statement"
if [ -n "$perf_pid" ]; then
  wait "$perf_pid" || true
  perf_pid=""
  perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
    | awk '/%/ {sub(/[[:space:]-]+$/, ""); print "perf, daemon samples by object: " $0}' | head -4 || true
  perf report -i "$work/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
    | awk '/%/ {sub(/[[:space:]-]+$/, ""); print "perf, top symbols: " $0}' | head -"${PERF_TOP:-6}" || true
  if [ "${BACKEND_PERF:-0}" = 1 ]; then
    perf report -i "$work/perf.data" --children --sort symbol --stdio -g none 2>/dev/null \
      | awk '/%/ {sub(/[[:space:]-]+$/, ""); print "perf, inclusive: " $0}' | head -"${PERF_TOP:-40}" || true
  fi
fi
if [ "${PHASES:-0}" = 1 ]; then
  for phase in bind execute; do
    grep "^citapulse-listener|LOG:  duration: .* $phase " "$work/pg.log" \
      | sed -E 's/.*duration: ([0-9.]+) ms.*/\1/' | sort -n \
      | awk -v p="$phase" '{v[NR] = $1} END { if (NR) printf "reader statement %s, ms: p10 %s p50 %s p90 %s p99 %s (n %d)\n", p, v[int(NR*0.1)+1], v[int(NR*0.5)+1], v[int(NR*0.9)+1], v[int(NR*0.99)+1], NR }'
  done
fi
