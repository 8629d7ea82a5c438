#!/usr/bin/env bash
# Issue 17's write-path decomposition: pgbench tps of the same single-row INSERT into copies
# of citas, each with one capture design (bench/variants/variants.sql), interleaved rounds,
# on a throwaway cluster (fsync on). The first table named is the ratio's base.
#   bench/variants/run.sh [CLIENTS] [SECS] [ROUNDS] [SYNC]      e.g. 16 6 3 on, or 2 5 5 off
#   TABLES="plain_citas lean_citas c2_citas citas" bench/variants/run.sh 16 6 3 on
# With SYNC=off and 2 clients the runs are CPU-bound (what each design costs the backend);
# with SYNC=on and 16 clients they are what the app sees. citas is the current capture().
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); proj=$(cd "$here/../.." && pwd)
C=${1:-16} S=${2:-6} R=${3:-3} SYNC=${4:-on}
TABLES=${TABLES:-"plain_citas lean_citas rowmin_citas min_citas c2_citas c4_citas c6_citas citas"}
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d); chmod 777 "$work"; port=$((30000 + RANDOM % 10000))
asp() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() { asp "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
asp "$pgbin/initdb" -D "$work/data" -U postgres -A trust >/dev/null
asp "$pgbin/pg_ctl" -D "$work/data" -w -l "$work/log" -o "-p $port -k $work -c listen_addresses=127.0.0.1 \
  -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_wal_size=4GB" start >/dev/null
q() { psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
q -f "$proj/sql/install.sql" >/dev/null
q -f "$proj/sql/example_schema.sql" >/dev/null
q -f "$here/variants.sql" >/dev/null
q -c "UPDATE citapulse.wakeup SET notify = false"   # the poll wake-up: no NOTIFY lock
declare -A sum
for r in $(seq "$R"); do
  for t in $TABLES; do
    f="$work/$t.sql"
    echo "SET synchronous_commit = $SYNC; INSERT INTO $t (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) VALUES ('T' || (1 + (random() * 19)::int), 'w', 'p', 's', current_date, '10:00', '10:30', 'pendiente');" >"$f"
    tps=$(pgbench -n -c "$C" -j 2 -T "$S" -f "$f" -h 127.0.0.1 -p "$port" -U postgres postgres 2>/dev/null | awk '/^tps =/{print $3}')
    echo "round $r  $t  $tps tps" >&2
    sum[$t]=$(echo "${sum[$t]:-0} + $tps" | bc -l)
  done
done
base=${TABLES%% *}
echo "== $C clients, synchronous_commit=$SYNC, mean of $R rounds × ${S}s; ratio to $base"
for t in $TABLES; do printf '%-16s %8.0f tps  %.3f×\n' "$t" "$(echo "${sum[$t]} / $R" | bc -l)" "$(echo "${sum[$t]} / ${sum[$base]}" | bc -l)"; done
