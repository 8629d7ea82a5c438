# Samples utime+stime (/proc/<pid>/stat, clock ticks) of every child of the postmaster and
# classifies it by its process title (the login role, or the process type). On SIGUSR1
# it appends one snapshot to OUT: cumulative ticks per class (an exited process counts
# with its last sample), the postmaster's own ticks and its cutime+cstime (every exited
# child, exactly: what the samples missed of them is the "tail"), and live pids' ticks.
import os, signal, sys, time, json
pm, out, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
live_seen = {}   # pid -> [class, ticks]
dead = {}        # class -> ticks of exited processes (last sample)
def classify(title):
    if not title.startswith('postgres: '): return None
    t = title[len('postgres: '):]
    if t.startswith('walsender'): return 'walsender'
    if t.startswith('autovacuum worker'): return 'autovacuum'
    if t.startswith('app '): return 'app'
    if t.startswith('citapulse '): return 'daemon'
    if t.startswith('postgres '): return 'harness'
    return 'background'   # checkpointer, walwriter, bgwriter, launchers
def stat(pid):
    with open(f'/proc/{pid}/stat') as f: s = f.read()
    r = s[s.rindex(')') + 2:].split()   # r[0] = field 3
    return int(r[1]), int(r[11]) + int(r[12]), int(r[13]) + int(r[14])
def sample():
    now = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        pid = int(d)
        try:
            ppid, t, _ = stat(pid)
            if ppid != pm: continue
            e = live_seen.get(pid)
            if e is not None and t < e[1]:          # pid reused
                dead[e[0]] = dead.get(e[0], 0) + e[1]; e = None; del live_seen[pid]
            if e is None or e[0] is None:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    title = f.read().split(b'\0')[0].decode(errors='replace')
                c = classify(title)
                if e is None: e = live_seen[pid] = [c, 0]
                else: e[0] = c
            e[1] = t; now[pid] = t
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
    for pid in [p for p in live_seen if p not in now]:
        c, t = live_seen.pop(pid)
        c = c or 'unclassified'
        dead[c] = dead.get(c, 0) + t
    return now
want = []
signal.signal(signal.SIGUSR1, lambda *_: want.append(1))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(out + '.ready', 'w').close()
while True:
    now = sample()
    if want:
        want.clear()
        _, own, children = stat(pm)
        cls = dict(dead)
        for pid, (c, t) in live_seen.items():
            c = c or 'unclassified'; cls[c] = cls.get(c, 0) + t
        rec = {'t': time.time(), 'pm_own': own, 'pm_children': children,
               'dead_sum': sum(dead.values()), 'class': cls,
               'pids': {str(p): t for p, t in now.items()}}
        with open(out, 'a') as f: f.write(json.dumps(rec) + '\n')
    time.sleep(interval)
