# Turns cost-breakdown.sh's snapshots into per-row figures: report.py WORK ROWS CLIENTS SUBSCRIBER
import json, os, sys

work, rows, clients, subscriber = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
TICK_US = 1e6 / os.sysconf('SC_CLK_TCK')
def lines(name):
    path = os.path.join(work, name)
    if not os.path.exists(path): return []
    return [json.loads(l) for l in open(path) if l.strip()]
samples, snaps = lines('samples.jsonl'), lines('snaps.jsonl')
assert len(samples) == len(snaps), (len(samples), len(snaps))
S = {h['name']: (h, s) for h, s in zip(snaps, samples)}
CLASSES = ['app', 'daemon', 'walsender', 'autovacuum', 'vacuum', 'background', 'harness', 'unclassified']

def window(a, b):
    (ha, sa), (hb, sb) = S[a], S[b]
    w = {c: (sb['class'].get(c, 0) - sa['class'].get(c, 0)) * TICK_US for c in CLASSES}
    w['postmaster'] = (sb['pm_own'] - sa['pm_own']) * TICK_US
    # exited children, exactly (the postmaster's cutime+cstime), less what the samples saw of them
    w['tail'] = ((sb['pm_children'] - sa['pm_children']) - (sb['dead_sum'] - sa['dead_sum'])) * TICK_US
    w['secs'] = hb['time'] - ha['time']
    w['wal'] = hb['lsn'] - ha['lsn']
    w['fpi'] = hb['wal']['wal_fpi'] - ha['wal']['wal_fpi']
    w['records'] = hb['wal']['wal_records'] - ha['wal']['wal_records']
    w['daemon_proc'] = (hb['daemon_ticks'] - ha['daemon_ticks']) * TICK_US if hb['daemon_ticks'] and ha['daemon_ticks'] else 0
    w['vac'] = {t: [hb['vac'][t][i] - ha['vac'].get(t, [0, 0, 0])[i] for i in (0, 1)] for t in hb['vac']}
    return w

def dbcpu(w):  # every database process but the script's own session
    return sum(w[c] for c in CLASSES if c != 'harness') + w['postmaster'] + w['tail']

out = []
def p(s=''): out.append(s); print(s)
p(f'== {rows} single-row INSERT commits, pgbench {clients} clients, fsync on; '
  f'{"one WebSocket subscriber (tenant T1 of 20)" if subscriber == "1" else "no subscriber"}')
p('   CPU in µs per captured row (utime+stime, 10 ms ticks summed over the run), WAL in bytes per row')
p()
p('window                    secs    app  daemon walsnd autovac vacuum  bgrnd  pmstr   tail  harn | DB total |   WAL B   FPI | daemon proc')
res = {}
def show(label, w):
    r = lambda x: x / rows
    p(f'{label:24s} {w["secs"]:5.1f} {r(w["app"]):6.1f} {r(w["daemon"]):7.1f} {r(w["walsender"]):6.1f} '
      f'{r(w["autovacuum"]):7.1f} {r(w["vacuum"]):6.1f} {r(w["background"]):6.1f} {r(w["postmaster"]):6.1f} '
      f'{r(w["tail"]):6.1f} {r(w["harness"]):5.1f} | {r(dbcpu(w)):8.1f} | {r(w["wal"]):7.1f} {w["fpi"]:5d} | {r(w["daemon_proc"]):6.1f}')

for ph in ['plain', 'trigger']:
    if f'{ph}_0' in S:
        w = window(f'{ph}_0', f'{ph}_end'); show(ph, w); res[ph] = w
for ph in ['daemon', 'wal']:
    if f'{ph}_0' not in S: continue
    idle = window(f'{ph}_idle0', f'{ph}_idle1')
    parts = [('load', f'{ph}_0', f'{ph}_load'), ('drain', f'{ph}_load', f'{ph}_drained'),
             ('prune wait', f'{ph}_drained', f'{ph}_pruned'), ('vacuum', f'{ph}_pruned', f'{ph}_end')]
    for name, a, b in parts: show(f'{ph}: {name}', window(a, b))
    tot = window(f'{ph}_0', f'{ph}_end'); show(f'{ph}: whole window', tot)
    # the idle daemon (safety polls, gauges, presence) over the same time, per row
    k = tot['secs'] / idle['secs']
    # Only the steady processes' idle rate is taken off; WAL (~50 B/s idle), autovacuum
    # and exited processes are counted whole (an autovacuum run inside the idle window
    # would otherwise be subtracted from the loaded one).
    net = dict(tot)
    for c in ['daemon', 'walsender', 'background', 'harness', 'postmaster', 'daemon_proc']:
        net[c] = tot[c] - idle[c] * k
    show(f'{ph}: less idle rate', net)
    p(f'{"":24s} idle rate over {idle["secs"]:.1f} s: daemon {idle["daemon"] / idle["secs"] / 1000:.1f} ms/s, '
      f'walsender {idle["walsender"] / idle["secs"] / 1000:.1f} ms/s, background {idle["background"] / idle["secs"] / 1000:.1f} ms/s, '
      f'WAL {idle["wal"] / idle["secs"]:.0f} B/s')
    p(f'{"":24s} vacuums in the window (manual, auto): ' + ', '.join(f'{t} {v[0]},{v[1]}' for t, v in sorted(tot['vac'].items()) if v != [0, 0]))
    apps = json.load(open(os.path.join(work, f'apps_{ph}.json')))
    a, b = S[f'{ph}_0'][1]['pids'], S[f'{ph}_end'][1]['pids']
    by = {}
    for pid, name in apps.items():
        if pid in a and pid in b: by[name] = by.get(name, 0) + (b[pid] - a[pid]) * TICK_US
    p(f'{"":24s} daemon connections (application_name), whole window, µs/row: ' +
      ', '.join(f'{n} {v / rows:.1f}' for n, v in sorted(by.items(), key=lambda kv: -kv[1])))
    res[ph] = net; res[ph + '_gross'] = tot; res[ph + '_load'] = window(f'{ph}_0', f'{ph}_load')

for t in ['full', 'key']:
    if f'logindex_{t}_0' in S:
        w = window(f'logindex_{t}_0', f'logindex_{t}_end')
        p(f'log copy, {"all indexes" if t == "full" else "key only":11s}: {w["harness"] / rows:6.1f} µs/row (the inserting backend), '
          f'{w["wal"] / rows:5.0f} B/row WAL, {w["fpi"]} FPI')
p()
if 'plain' in res:
    base = res['plain']; bcpu, bwal, bapp = dbcpu(base) / rows, base['wal'] / rows, (base['app'] + base['tail']) / rows
    p(f'== per captured row against the unwatched write (plain: app backends {bapp:.1f} µs, '
      f'all database processes {bcpu:.1f} µs, WAL {bwal:.0f} B)')
    p('design                     app µs  daemon-side DB µs (daemon+walsnd+vacuums)  DB total µs  ×plain | WAL B/row  ×plain | daemon WAL B/row (total − plain)')
    for ph, label in [('plain', 'unwatched (a)'), ('trigger', 'triggers alone (b)'), ('daemon', 'trigger mode + daemon (c)'), ('wal', 'WAL mode + daemon (d)')]:
        if ph not in res: continue
        w = res[ph]
        # The app's backends exit when pgbench ends: their CPU is in the load window, with
        # the tail (what the samples missed of exited processes) of that window, which is
        # theirs but for any autovacuum worker or vacuum connection ending then
        # (conservative: it counts against capture). Later tails go to the daemon side.
        ld = res.get(ph + '_load', w)
        app = ld['app'] + ld['tail']
        side = w['daemon'] + w['walsender'] + w['autovacuum'] + w['vacuum'] + (w['tail'] - ld['tail'])
        p(f'{label:26s} {app / rows:6.1f}  {side / rows:8.1f}{"":33s} {dbcpu(w) / rows:10.1f}  {dbcpu(w) / rows / bcpu:5.2f}× | '
          f'{w["wal"] / rows:9.0f}  {w["wal"] / rows / bwal:5.2f}× | {(w["wal"] / rows - bwal) if ph != "plain" else 0:8.0f}')
        res[ph + '_summary'] = dict(app=app / rows, side=side / rows, db=dbcpu(w) / rows, wal=w['wal'] / rows)
    json.dump({k: v for k, v in res.items() if k.endswith('_summary')}, open(os.path.join(work, 'summary.json'), 'w'))

p()
for st in lines('statements.jsonl'):
    p(f'== {st["phase"]}: statements by database time (pg_stat_statements, track = all: nested statements '
      f'are also inside their caller\'s time)')
    p(f'{"role":9s} {"top":3s} {"calls":>7s} {"rows":>7s} {"ms":>9s} {"µs/row":>7s} {"WAL B/row":>9s}  query')
    for r in st['rows'] or []:
        p(f'{r["role"]:9s} {"y" if r["toplevel"] else "n":3s} {r["calls"]:7d} {r["rows"]:7d} {r["ms"]:9.1f} '
          f'{r["ms"] * 1000 / rows:7.1f} {r["wal"] / rows:9.1f}  {r["query"]}')
    p()
for f in ['metrics.txt', 'pgbench.txt']:
    path = os.path.join(work, f)
    if os.path.exists(path):
        p(f'== {f}'); p(open(path).read().rstrip()); p()
