#!/usr/bin/env bash
# What capture costs the database per captured row: CPU of PostgreSQL's processes
# (utime+stime from /proc, by process: the app's backends, the daemon's, autovacuum,
# the walsender, the background processes) and WAL bytes (pg_current_wal_lsn), for the
# same N single-row INSERT commits (pgbench -t, fsync on) on one throwaway cluster:
#   plain    an unwatched copy of citas (no trigger): the base of every ratio
#   trigger  citas watched, no daemon: the triggers alone (the inbox just grows; poll
#            wake-up, no NOTIFY)
#   daemon   citas watched, the real daemon running (default config, adaptive wake-up)
#            with one WebSocket subscriber (SUBSCRIBER=0: none); the window runs until
#            the inbox is moved, the log pruned (outbox.retention = 1m, the minimum) and
#            the pruned log vacuumed (VACUUM run by the script, standing in for autovacuum)
#   wal      capture_mode('wal'), the daemon streaming the slot, same window
#   logindex the same rows into a copy of citapulse.events with all its indexes and into
#            one with only its key (WAL and CPU of the script's own backend)
# The app connects as role `app`, the daemon as `citapulse`, the script as `postgres`
# (and `vacuum` for its VACUUM), so every backend is classified by its process title.
# pg_stat_statements (track = all) attributes the daemon's database time per statement.
#   cargo build --release --bin citapulse
#   bench/variants/cost-breakdown.sh                   # ROWS=20000 CLIENTS=8
# Env: KEEP=1 keeps the temp dir (logs); ROWS, CLIENTS, SUBSCRIBER (1), PHASES ("plain trigger daemon wal"),
#      DAEMON_BIN (default $CARGO_TARGET_DIR or target/ release/citapulse), PGBIN.
# Autovacuum is off for the two app tables in every phase (their vacuum is the same with
# or without citapulse); it stays on for citapulse's tables.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); proj=$(cd "$here/../.." && pwd)
ROWS=${ROWS:-20000} CLIENTS=${CLIENTS:-8} SUBSCRIBER=${SUBSCRIBER:-1}
PHASES=${PHASES:-"plain trigger daemon wal logindex"}
DAEMON_BIN=${DAEMON_BIN:-${CARGO_TARGET_DIR:-$proj/target}/release/citapulse}
pgbin=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$DAEMON_BIN" ] || { echo "no daemon at $DAEMON_BIN: cargo build --release --bin citapulse" >&2; exit 1; }
[ $((ROWS % CLIENTS)) -eq 0 ] || { echo "ROWS must be a multiple of CLIENTS" >&2; exit 1; }
work=$(mktemp -d); chmod 777 "$work"; port=$((30000 + RANDOM % 10000)); wsport=$((port + 1))
asp() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
sampler="" daemon="" sub="" started=$(date +%s)
stop_daemon() {
  if [ -n "$sub" ]; then kill "$sub" 2>/dev/null || true; wait "$sub" 2>/dev/null || true; sub=""; fi
  if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; daemon=""; fi
}
cleanup() {
  stop_daemon
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  [ -n "${PSQL_PID:-}" ] && kill "$PSQL_PID" 2>/dev/null
  asp "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

asp "$pgbin/initdb" -D "$work/data" -U postgres -A trust >/dev/null
asp "$pgbin/pg_ctl" -D "$work/data" -w -l "$work/pg.log" -o "-p $port -k $work -c listen_addresses=127.0.0.1 \
  -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c shared_buffers=256MB -c max_wal_size=4GB \
  -c wal_level=logical -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
  -c pg_stat_statements.max=2000" start >/dev/null
pm=$(head -1 "$work/data/postmaster.pid")
q() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
q -c "CREATE ROLE app SUPERUSER LOGIN; CREATE ROLE citapulse SUPERUSER LOGIN REPLICATION;
      CREATE ROLE vacuum SUPERUSER LOGIN; CREATE EXTENSION pg_stat_statements;"
url="postgres://citapulse@127.0.0.1:$port/postgres?sslmode=disable"
DATABASE_URL=$url "$DAEMON_BIN" sql install --apply >"$work/install.log" 2>&1
q -f "$proj/sql/example_schema.sql" >/dev/null
q <<'SQL' >/dev/null
CREATE TABLE plain_citas (
    id bigserial PRIMARY KEY, negocio_id text NOT NULL, cliente_id text, profesional_id text,
    servicio_id text, fecha date, hora_inicio time, hora_fin time,
    estado text NOT NULL DEFAULT 'pendiente'
           CHECK (estado IN ('pendiente', 'confirmada', 'atendida', 'cancelada')));
CREATE INDEX ON plain_citas (negocio_id, fecha);
CREATE INDEX ON plain_citas (fecha);
ALTER TABLE plain_citas SET (autovacuum_enabled = false);
ALTER TABLE citas SET (autovacuum_enabled = false);
SQL

# One long-lived session for the script's own queries (a psql per query would be a
# backend start per poll, whose CPU the samples could miss).
coproc PSQL { psql -X -q -A -t -h 127.0.0.1 -p "$port" -U postgres -d postgres 2>&1; }
sqlq() { # one statement -> its output
  local line out=""
  printf '%s;\n\\echo __end__\n' "$1" >&"${PSQL[1]}"
  while IFS= read -r line <&"${PSQL[0]}"; do [ "$line" = __end__ ] && break; out+="$line"$'\n'; done
  printf '%s' "${out%$'\n'}"
}

touch "$work/samples.jsonl"
python3 "$here/cost/sampler.py" "$pm" "$work/samples.jsonl" 0.02 & sampler=$!
until [ -e "$work/samples.jsonl.ready" ]; do sleep 0.05; kill -0 "$sampler"; done
snap() { # name: a sampler snapshot plus the WAL position, per-table vacuum counts, daemon CPU
  local n; n=$(wc -l <"$work/samples.jsonl" 2>/dev/null || echo 0)
  kill -USR1 "$sampler"
  while [ "$(wc -l <"$work/samples.jsonl" 2>/dev/null || echo 0)" -le "$n" ]; do sleep 0.01; done
  local d=0
  if [ -n "$daemon" ] && [ -r "/proc/$daemon/stat" ]; then d=$(awk '{print $14 + $15}' "/proc/$daemon/stat"); fi
  sqlq "SELECT json_build_object('name', '$1', 'time', extract(epoch FROM clock_timestamp()),
          'lsn', pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'), 'daemon_ticks', $d,
          'wal', (SELECT row_to_json(w) FROM (SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal) w),
          'vac', (SELECT json_object_agg(relname, json_build_array(vacuum_count, autovacuum_count, n_dead_tup))
                    FROM pg_stat_all_tables WHERE schemaname = 'citapulse'))" >>"$work/snaps.jsonl"
  echo >>"$work/snaps.jsonl"
}
wait_for() { # sql that returns t, timeout s, what
  local t0=$SECONDS
  until [ "$(sqlq "$1")" = t ]; do
    if [ $((SECONDS - t0)) -ge "$2" ]; then echo "timed out after $2 s waiting for: $3" >&2; return 1; fi
    sleep 0.2
  done
}
echo "INSERT INTO :tbl (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) VALUES ('T' || (1 + (random() * 19)::int), 'c' || (random() * 1000)::int, 'p' || (random() * 20)::int, 's', current_date, '10:00', '10:30', 'pendiente');" >"$work/insert.sql"
load() { # table
  pgbench -n -h 127.0.0.1 -p "$port" -U app -c "$CLIENTS" -j 2 -t $((ROWS / CLIENTS)) -D tbl="$1" \
    -f "$work/insert.sql" postgres >"$work/pgbench.out" 2>&1 || { cat "$work/pgbench.out" >&2; return 1; }
  echo "$1: $(grep -E '^tps|failed' "$work/pgbench.out" | tr '\n' ' ')" >>"$work/pgbench.txt"
}

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
secret=cost-breakdown-secret-0123456789
token() {
  local h p s
  h=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
  p=$(printf '{"sub":"u1","negocio_id":"T1","role":"staff","exp":%d}' $(($(date +%s) + 3600)) | b64url)
  s=$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
  printf '%s.%s.%s' "$h" "$p" "$s"
}
cat >"$work/citapulse.toml" <<TOML
listen = "127.0.0.1:$wsport"
instance = "cost"
[database]
url = "$url"
[auth]
jwt_secret = "$secret"
[reminders]
minutes_before = []
[outbox]
retention = "1m"
prune_every = "2s"
[log]
level = "warn"
TOML
start_daemon() { # capture mode expected
  "$DAEMON_BIN" serve --config "$work/citapulse.toml" >>"$work/daemon.log" 2>&1 & daemon=$!
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$wsport/health" 2>/dev/null | grep -q "\"capture\":\"$1\""; do
    sleep 0.2
    if [ $((SECONDS - t0)) -ge 30 ] || ! kill -0 "$daemon" 2>/dev/null; then
      echo "daemon not up in $1 mode:" >&2; tail -20 "$work/daemon.log" >&2; return 1
    fi
  done
  if [ "$SUBSCRIBER" = 1 ]; then
    node --experimental-websocket --no-warnings "$here/cost/subscriber.mjs" \
      "ws://127.0.0.1:$wsport/ws?token=$(token)" estadisticas:T1 >"$work/sub.log" 2>&1 & sub=$!
    touch "$work/sub.log"
    t0=$SECONDS
    until grep -q subscribed "$work/sub.log"; do
      sleep 0.1; [ $((SECONDS - t0)) -lt 15 ] || { echo "subscriber failed:" >&2; cat "$work/sub.log" >&2; return 1; }
    done
  fi
  sleep 3
}
statements() { # phase: the daemon's and the app's statements, by database time
  sqlq "SELECT json_build_object('phase', '$1', 'rows', jsonb_agg(s)) FROM (
          SELECT r.rolname AS role, s.toplevel, s.calls, s.rows, round(s.total_exec_time::numeric, 1) AS ms,
                 s.wal_bytes::bigint AS wal, s.shared_blks_hit + s.shared_blks_read AS blks,
                 left(regexp_replace(s.query, '\s+', ' ', 'g'), 110) AS query
            FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
           WHERE r.rolname IN ('citapulse', 'app') AND s.total_exec_time > 1
           ORDER BY s.total_exec_time DESC LIMIT 40) s" >>"$work/statements.jsonl"
  echo >>"$work/statements.jsonl"
}
daemon_window() { # phase: idle baseline, load, drain, prune, vacuum
  local p=$1
  snap "${p}_idle0"; sleep 10; snap "${p}_idle1"
  sqlq "SELECT json_object_agg(pid, application_name || CASE WHEN backend_type = 'walsender' THEN ' (walsender)' ELSE '' END)
          FROM pg_stat_activity WHERE usename = 'citapulse'" >"$work/apps_$p.json"
  sqlq "SELECT pg_stat_statements_reset()" >/dev/null
  sqlq "CHECKPOINT" >/dev/null
  snap "${p}_0"; load citas; snap "${p}_load"
  if [ "$p" = daemon ]; then
    wait_for "SELECT NOT EXISTS (SELECT FROM citapulse.inbox)" 60 "the inbox to be moved"
  else
    wait_for "SELECT (SELECT count(*) FROM citapulse.events) >= $ROWS" 60 "the slot to be logged"
  fi
  snap "${p}_drained"
  wait_for "SELECT NOT EXISTS (SELECT FROM citapulse.events)" 120 "the log to be pruned"
  snap "${p}_pruned"
  psql -X -q -h 127.0.0.1 -p "$port" -U vacuum -d postgres -c "VACUUM citapulse.events, citapulse.inbox"
  snap "${p}_end"
  curl -sf "http://127.0.0.1:$wsport/metrics" | grep -E '^citapulse_(log_reads_total|events_read_total|pruned_rows_total|stats_queries_total|wakeup_switches_total|wal_rows_total)' \
    | sed "s/^/$p /" >>"$work/metrics.txt" || true
  statements "$p"
  stop_daemon
  [ "$SUBSCRIBER" = 1 ] && sed "s/^/$p subscriber /" "$work/sub.log" >>"$work/metrics.txt"
  return 0
}
reset_tables() {
  sqlq "TRUNCATE citas" >/dev/null
  sqlq "TRUNCATE citapulse.inbox" >/dev/null
  sqlq "VACUUM citapulse.events" >/dev/null
}

for phase in $PHASES; do
  echo "phase $phase ($(($(date +%s) - started)) s)" >&2
  case $phase in
    plain)
      sqlq "SELECT pg_stat_statements_reset()" >/dev/null; sqlq "CHECKPOINT" >/dev/null
      snap plain_0; load plain_citas; snap plain_end; statements plain ;;
    trigger)
      sqlq "UPDATE citapulse.wakeup SET notify = false" >/dev/null
      sqlq "SELECT pg_stat_statements_reset()" >/dev/null; sqlq "CHECKPOINT" >/dev/null
      snap trigger_0; load citas; snap trigger_end; statements trigger
      [ "$(sqlq "SELECT count(*) FROM citapulse.inbox")" = "$ROWS" ] || echo "trigger: inbox does not hold $ROWS rows" >&2
      reset_tables ;;
    daemon)
      sqlq "UPDATE citapulse.wakeup SET notify = true" >/dev/null
      start_daemon trigger; daemon_window daemon; reset_tables ;;
    wal)
      sqlq "SELECT citapulse.capture_mode('wal')" >/dev/null
      start_daemon wal; daemon_window wal ;;
    logindex)
      # What the log's secondary indexes cost per row: the same rows (a citas row as JSON,
      # 10 a transaction, about the daemon's move batch) into a copy of citapulse.events
      # with all its indexes and into one with only its key; the script's own backend.
      sqlq "CREATE TABLE cost_log_full (LIKE citapulse.events INCLUDING ALL)" >/dev/null
      sqlq "CREATE TABLE cost_log_key (LIKE citapulse.events INCLUDING DEFAULTS); ALTER TABLE cost_log_key ADD PRIMARY KEY (id)" >/dev/null
      for t in full key; do
        sqlq "CHECKPOINT" >/dev/null
        snap "logindex_${t}_0"
        sqlq "DO \$\$ BEGIN FOR i IN 1..$((ROWS / 10)) LOOP
                INSERT INTO cost_log_$t (tenant, kind, tbl, op, row_data)
                SELECT 'T' || (1 + g % 20), 'appointment', 'public.citas', 'INSERT',
                       jsonb_build_object('id', i * 10 + g, 'negocio_id', 'T' || (1 + g % 20), 'cliente_id', 'c' || g,
                         'profesional_id', 'p' || g % 20, 'servicio_id', 's', 'fecha', current_date,
                         'hora_inicio', '10:00:00', 'hora_fin', '10:30:00', 'estado', 'pendiente')
                  FROM generate_series(1, 10) g;
                COMMIT; END LOOP; END \$\$" >/dev/null
        snap "logindex_${t}_end"
      done ;;
    *) echo "unknown phase $phase" >&2; exit 1 ;;
  esac
done
echo "done ($(($(date +%s) - started)) s)" >&2
python3 "$here/cost/report.py" "$work" "$ROWS" "$CLIENTS" "$SUBSCRIBER"
