#!/usr/bin/env bash
# What a single-row UPDATE (a status change, same tenant) costs the app under the current
# capture() against another revision's, side by side: pgbench tps on one throwaway cluster
# (fsync on), interleaved rounds, three tables of 10 000 rows each:
#   plain   no trigger (the base)
#   base    citas watched with sql/install.sql of BASE (a git revision)
#   current citas watched with this checkout's sql/install.sql
#   BASE=d90e73a bench/variants/update-cost.sh [CLIENTS] [SECS] [ROUNDS] [SYNC]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); proj=$(cd "$here/../.." && pwd)
C=${1:-16} S=${2:-6} R=${3:-3} SYNC=${4:-on}
BASE=${BASE:?set BASE to the git revision to compare with, e.g. BASE=HEAD~1}
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d); chmod 777 "$work"; port=$((30000 + RANDOM % 10000))
asp() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() { asp "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
git -C "$proj" show "$BASE:sql/install.sql" >"$work/base-install.sql"
asp "$pgbin/initdb" -D "$work/data" -U postgres -A trust >/dev/null
asp "$pgbin/pg_ctl" -D "$work/data" -w -l "$work/log" -o "-p $port -k $work -c listen_addresses=127.0.0.1 \
  -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_wal_size=4GB" start >/dev/null
q() { local db=$1; shift; psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
fill="INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado)
      SELECT 'T' || (1 + g % 20), 'c' || g, 'p', 's', current_date, '10:00', '10:30', 'pendiente'
        FROM generate_series(1, 10000) g;
      UPDATE citapulse.wakeup SET notify = false;
      DELETE FROM citapulse.inbox;"
for db in plain base current; do
  q postgres -c "CREATE DATABASE $db"
done
q plain -f "$proj/sql/install.sql" >/dev/null 2>&1
q plain -f "$proj/sql/example_schema.sql" >/dev/null
q plain -c "SELECT citapulse.unwatch('citas'::regclass)" >/dev/null
q base -f "$work/base-install.sql" >/dev/null 2>&1
q base -f "$proj/sql/example_schema.sql" >/dev/null
q current -f "$proj/sql/install.sql" >/dev/null 2>&1
q current -f "$proj/sql/example_schema.sql" >/dev/null
for db in plain base current; do q "$db" -c "$fill" >/dev/null; q "$db" -c "VACUUM ANALYZE" >/dev/null; done
cat >"$work/update.sql" <<SQL
SET synchronous_commit = $SYNC;
\set id random(1, 10000)
UPDATE citas SET estado = CASE WHEN estado = 'pendiente' THEN 'confirmada' ELSE 'pendiente' END WHERE id = :id;
SQL
declare -A sum
for r in $(seq "$R"); do
  for db in plain base current; do
    tps=$("$pgbin/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c "$C" -j "$C" -T "$S" \
      -f "$work/update.sql" "$db" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    echo "round $r $db: $tps tps"
    sum[$db]=$(echo "${sum[$db]:-0} + $tps" | bc -l)
    # The inbox grows with every captured UPDATE; empty it between runs as the daemon would.
    q "$db" -c "DELETE FROM citapulse.inbox" >/dev/null 2>&1 || true
  done
done
plain=$(echo "${sum[plain]} / $R" | bc -l)
for db in plain base current; do
  avg=$(echo "${sum[$db]} / $R" | bc -l)
  printf '%-8s %9.0f tps  %.2fx of plain\n' "$db" "$avg" "$(echo "$avg / $plain" | bc -l)"
done
