//! Scenario 5 (and issue 9's measurements): what citapulse costs the legacy app's
//! writes, with `pgbench` custom scripts (`bench/pgbench/`), 1 and 16 clients, against
//! no trigger, a plain row trigger calling `pg_notify` (what a LISTEN/NOTIFY forwarder
//! needs) and citapulse's triggers in each wake-up mode with the daemon running.
//!
//! Every run starts from the same state: tables truncated, a CHECKPOINT, the wakeup
//! row reset to notifying. The cluster runs with fsync=on and synchronous_commit=on.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio_postgres::NoTls;

use crate::Bench;
use crate::error::{Context, Result, failed};
use crate::report::{Section, Table, median, num, ratio, round};

/// The scripts, embedded so the harness runs from anywhere; written next to the results.
const SCRIPTS: &[(&str, &str)] = &[
    ("insert_1", include_str!("pgbench/insert_1.sql")),
    ("insert_100", include_str!("pgbench/insert_100.sql")),
    ("update_1", include_str!("pgbench/update_1.sql")),
];
/// Rows seeded for the UPDATE script.
const UPDATE_ROWS: i64 = 20_000;
/// The tenant the daemon's subscriber watches during a run.
const WATCHED_TENANT: &str = "pgb_1";

/// An older `sql/install.sql` moved to its own schema.
fn in_schema(sql: &str, schema: &str) -> String {
    sql.replace("citapulse.", &format!("{schema}.")).replace(
        "SCHEMA IF NOT EXISTS citapulse;",
        &format!("SCHEMA IF NOT EXISTS {schema};"),
    )
}

/// The contestants that are not the current SQL: version 1 of `sql/install.sql` (the
/// commit before issue 17) in schema `citapulse_v1`, version 3 (one trigger write into
/// the indexed log, the wakeup row read per statement) in `citapulse_v3`, and the lean
/// floor.
fn contestants_sql() -> String {
    let v1 = in_schema(
        include_str!("../tests/fixtures/install_v1.sql"),
        "citapulse_v1",
    );
    let v3 = in_schema(
        include_str!("../tests/fixtures/install_v3.sql"),
        "citapulse_v3",
    );
    format!(
        "{v1}
         UPDATE citapulse_v1.wakeup SET notify = false;
         {v3}
         UPDATE citapulse_v3.wakeup SET notify = false;
         CREATE TABLE IF NOT EXISTS bench_lean_log (id bigserial PRIMARY KEY, tenant text, row_data jsonb,
                                                    xid xid8 DEFAULT pg_current_xact_id());
         CREATE OR REPLACE FUNCTION bench_lean_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO bench_lean_log (tenant, row_data) SELECT n.negocio_id, to_jsonb(n) FROM bench_new n;
             RETURN NULL;
         END $$;"
    )
}

/// What is attached to `citas` during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    /// No trigger at all.
    None,
    /// A plain row trigger calling `pg_notify` with the row (the Node baseline's feed).
    RowNotify,
    /// citapulse's triggers, daemon in `wakeup.mode = notify`.
    Notify,
    /// citapulse's triggers, daemon in `wakeup.mode = poll`.
    Poll,
    /// citapulse's triggers, daemon in the default `wakeup.mode = adaptive`.
    Adaptive,
    /// `capture()` as it was before issue 17 (SQL version 1, in schema `citapulse_v1`),
    /// silent triggers (its poll wake-up), no daemon: the write path alone.
    Previous,
    /// `capture()` of SQL version 3 (in schema `citapulse_v3`), silent, no daemon.
    V3,
    /// The floor: a statement trigger doing only `INSERT … SELECT tenant, to_jsonb(n)`
    /// into a log whose only index is its key, no daemon.
    LeanFloor,
    /// The lean floor plus the cheapest consumer: one connection reading the new log
    /// rows every 10 ms (`id > last`, no late-commit handling, no indexing, no
    /// delivery). What any design with a reader on the same cores can hope for.
    LeanReader,
    /// citapulse in WAL capture mode (no trigger; the daemon streams the slot), daemon
    /// running with a subscriber.
    Wal,
    /// The floor of any WAL design: no trigger, a logical slot decoded meanwhile by
    /// `pg_recvlogical` (test_decoding, to /dev/null).
    SlotFloor,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::None => "no trigger",
            Config::RowNotify => "row trigger + pg_notify",
            Config::Notify => "citapulse notify",
            Config::Poll => "citapulse poll",
            Config::Adaptive => "citapulse adaptive (default)",
            Config::Previous => "capture() before #17 (poll, no daemon)",
            Config::V3 => "capture() v3 (poll, no daemon)",
            Config::LeanFloor => "lean floor (no daemon)",
            Config::LeanReader => "lean floor + bare reader",
            Config::Wal => "citapulse WAL mode",
            Config::SlotFloor => "no trigger + slot decoded (WAL floor)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::RowNotify => "row_notify",
            Config::Notify => "notify",
            Config::Poll => "poll",
            Config::Adaptive => "adaptive",
            Config::Previous => "previous",
            Config::V3 => "v3",
            Config::LeanFloor => "lean_floor",
            Config::LeanReader => "lean_reader",
            Config::Wal => "wal",
            Config::SlotFloor => "slot_floor",
        }
    }

    fn mode(self) -> Option<&'static str> {
        match self {
            Config::Notify => Some("notify"),
            Config::Poll => Some("poll"),
            Config::Adaptive | Config::Wal => Some("adaptive"),
            Config::None
            | Config::RowNotify
            | Config::Previous
            | Config::V3
            | Config::LeanFloor
            | Config::LeanReader
            | Config::SlotFloor => None,
        }
    }
}

/// What the trigger-cost scenario runs (`--pgbench-*` flags).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Seconds per pgbench run.
    pub secs: u64,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Script names (`bench/pgbench/<name>.sql`).
    pub scripts: Vec<String>,
}

/// One configuration's pgbench results over the rounds.
#[derive(Debug, Clone, Default)]
struct Runs {
    /// tps over each whole run.
    tps: Vec<f64>,
    /// Per-second tps after the first 1.5 s of every run (adaptive has switched by then).
    per_second: Vec<f64>,
    /// Wake-up mode the triggers were in at the end of each run (citapulse configs).
    mode_at_end: Vec<String>,
}

impl Runs {
    /// The median per-second tps in steady state.
    fn steady(&self) -> f64 {
        median(self.per_second.iter().copied())
    }
}

/// Whether `pgbench` is on PATH.
pub fn available() -> bool {
    std::process::Command::new("pgbench")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn write_scripts(dir: &Path) -> Result<PathBuf> {
    let dir = dir.join("pgbench");
    std::fs::create_dir_all(&dir).ctx(format!("creating {}", dir.display()))?;
    for (name, text) in SCRIPTS {
        let path = dir.join(format!("{name}.sql"));
        std::fs::write(&path, text).ctx(format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// Brings `citas` and the log to the same state before every run.
async fn prepare(
    b: &Bench,
    admin: &tokio_postgres::Client,
    config: Config,
    script: &str,
) -> Result<()> {
    // TRUNCATE would deadlock with a stopped daemon's last transaction (seen once).
    crate::env::wait_for_daemon_sessions_to_end(admin).await?;
    leave_wal_mode(admin).await?;
    admin
        .batch_execute(
            "SET session_replication_role = replica; \
             TRUNCATE citas, citapulse.events, citapulse.inbox, citapulse_v1.events, citapulse_v3.events, \
                      bench_lean_log RESTART IDENTITY; \
             SET session_replication_role = origin; \
             DROP TRIGGER IF EXISTS bench_notify ON citas; \
             DROP TRIGGER IF EXISTS bench_lean_insert ON citas; \
             DROP TRIGGER IF EXISTS bench_lean_update ON citas; \
             SELECT citapulse_v1.unwatch('public.citas'::regclass); \
             SELECT citapulse_v3.unwatch('public.citas'::regclass)",
        )
        .await
        .ctx("truncating before a pgbench run")?;
    if script == "update_1" {
        admin
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
                 SELECT 'pgb_' || (g % 1000), 'c', 'p1', current_date, '09:00', '09:30', 'pendiente' \
                   FROM generate_series(1, $1::bigint) g",
                &[&UPDATE_ROWS],
            )
            .await
            .ctx("seeding rows for the update script")?;
    }
    let attach = match config {
        Config::None => "SELECT citapulse.unwatch('public.citas'::regclass)",
        Config::RowNotify => {
            "SELECT citapulse.unwatch('public.citas'::regclass); \
             CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON citas \
               FOR EACH ROW EXECUTE FUNCTION bench_notify_row('bench_pgbench')"
        }
        Config::Previous => {
            "SELECT citapulse.unwatch('public.citas'::regclass); \
             SELECT citapulse_v1.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment')"
        }
        Config::V3 => {
            "SELECT citapulse.unwatch('public.citas'::regclass); \
             SELECT citapulse_v3.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment')"
        }
        Config::LeanFloor | Config::LeanReader => {
            "SELECT citapulse.unwatch('public.citas'::regclass); \
             CREATE TRIGGER bench_lean_insert AFTER INSERT ON citas REFERENCING NEW TABLE AS bench_new \
               FOR EACH STATEMENT EXECUTE FUNCTION bench_lean_capture(); \
             CREATE TRIGGER bench_lean_update AFTER UPDATE ON citas REFERENCING NEW TABLE AS bench_new \
               FOR EACH STATEMENT EXECUTE FUNCTION bench_lean_capture()"
        }
        Config::Notify | Config::Poll | Config::Adaptive | Config::Wal => {
            "SELECT citapulse.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment')"
        }
        Config::SlotFloor => "SELECT citapulse.unwatch('public.citas'::regclass)",
    };
    admin
        .batch_execute(attach)
        .await
        .ctx(format!("attaching triggers for {}", config.key()))?;
    // A slot may only be created by a transaction that has written nothing: apart.
    match config {
        Config::Wal => {
            admin
                .batch_execute("SELECT citapulse.capture_mode('wal')")
                .await
                .ctx("switching to WAL capture")?;
        }
        Config::SlotFloor => {
            admin
                .batch_execute(
                    "SELECT pg_create_logical_replication_slot('bench_floor', 'test_decoding')",
                )
                .await
                .ctx("creating the floor's slot")?;
        }
        _ => {}
    }
    // One statement per call: VACUUM refuses the implicit transaction of a batch.
    for sql in ["VACUUM ANALYZE citas", "CHECKPOINT"] {
        admin.batch_execute(sql).await.ctx(sql)?;
    }
    b.db.reset_wakeup(admin).await
}

/// Back to trigger capture with no slot left (a stopped daemon leaves its slot).
async fn leave_wal_mode(admin: &tokio_postgres::Client) -> Result<()> {
    admin
        .batch_execute(
            "SELECT citapulse.capture_mode('trigger') WHERE (SELECT capture FROM citapulse.settings) = 'wal'",
        )
        .await
        .ctx("leaving WAL capture")?;
    admin
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
              WHERE slot_name IN ('citapulse', 'bench_floor') AND NOT active; \
             DELETE FROM citapulse.wal_position",
        )
        .await
        .ctx("dropping the capture slots")
}

/// `pg_recvlogical` decoding the floor's slot to /dev/null until killed.
fn slot_reader(b: &Bench) -> Result<tokio::process::Child> {
    tokio::process::Command::new("pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "bench",
            "-S",
            "bench_floor",
        ])
        .arg("-p")
        .arg(b.db.port().to_string())
        .args(["--start", "-f", "/dev/null"])
        .kill_on_drop(true)
        .spawn()
        .ctx("starting pg_recvlogical")
}

/// Runs pgbench; returns the run's tps and the per-second tps after 1.5 s.
async fn pgbench(b: &Bench, script: &Path, clients: usize, secs: u64) -> Result<(f64, Vec<f64>)> {
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args([
        "-n",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-M",
        "prepared",
        "-P",
        "1",
    ])
    .arg("-p")
    .arg(b.db.port().to_string())
    .arg("-c")
    .arg(clients.to_string())
    .arg("-j")
    .arg(clients.min(2).to_string())
    .arg("-T")
    .arg(secs.to_string())
    .arg("-D")
    .arg(format!("rows={UPDATE_ROWS}"))
    .arg("-f")
    .arg(script)
    .arg("bench")
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 60), cmd.output())
        .await
        .map_err(|_| failed("pgbench did not finish in time"))?
        .ctx("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(failed(format!("pgbench failed ({}): {stderr}", out.status)));
    }
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .ok_or_else(|| failed(format!("no tps in pgbench output: {stdout}")))?;
    // "progress: 3.0 s, 1234.5 tps, lat 0.810 ms stddev 0.123, 0 failed"
    let per_second: Vec<f64> = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("progress: ")?;
            let mut parts = rest.split(", ");
            let at: f64 = parts.next()?.trim_end_matches(" s").parse().ok()?;
            let tps: f64 = parts.next()?.trim_end_matches(" tps").parse().ok()?;
            (at > 1.5).then_some(tps)
        })
        .collect();
    Ok((tps, per_second))
}

/// Drains notifications of the row-trigger channel, as the baseline's server would.
async fn drain_listener(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .ctx("connecting the pgbench listener")?;
    let task = tokio::spawn(async move {
        while let Some(Ok(_)) = poll_fn(|cx| connection.poll_message(cx)).await {}
    });
    client
        .batch_execute("LISTEN bench_pgbench")
        .await
        .ctx("LISTEN bench_pgbench")?;
    Ok((client, task))
}

/// The lean floor's consumer (see [`Config::LeanReader`]): reads until aborted.
async fn bare_reader(url: &str) -> Result<tokio::task::JoinHandle<()>> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .ctx("connecting the bare reader")?;
    let driver = tokio::spawn(connection);
    let stmt = client
        .prepare(
            "SELECT id, tenant, row_data::text FROM bench_lean_log WHERE id > $1 ORDER BY id LIMIT 5000",
        )
        .await
        .ctx("preparing the bare reader")?;
    Ok(tokio::spawn(async move {
        let mut last = 0i64;
        while let Ok(rows) = client.query(&stmt, &[&last]).await {
            for row in &rows {
                last = last.max(row.get::<_, i64>(0));
            }
            if rows.len() < 5000 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        driver.abort();
    }))
}

/// A subscriber of [`WATCHED_TENANT`] that reads and discards until aborted.
async fn subscribe_and_drain(
    b: &Bench,
    addr: std::net::SocketAddr,
) -> Result<tokio::task::JoinHandle<()>> {
    use futures_util::StreamExt;
    let token = b.tokens.tenant(WATCHED_TENANT)?;
    let mut ws =
        crate::client::connect(addr, crate::client::source_of(0), &token, 64 * 1024).await?;
    crate::client::subscribe(&mut ws, WATCHED_TENANT).await?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(_)) = ws.next().await {}
    }))
}

/// Scenario 5.
pub async fn scenario(b: &Bench) -> Result<Section> {
    let mut section = Section::new("trigger_cost");
    if !available() {
        section
            .notes
            .push("pgbench is not installed: scenario skipped".into());
        return Ok(section);
    }
    let dir = write_scripts(&b.out_dir)?;
    let known: Vec<&str> = SCRIPTS.iter().map(|(name, _)| *name).collect();
    let wanted: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| b.pgbench.scripts.iter().any(|s| s == k))
        .collect();
    let (scripts, clients, configs, secs): (&[&str], &[usize], &[Config], u64) = if b.quick {
        (&["insert_1"], &[1], &[Config::None, Config::Notify], 2)
    } else {
        (
            &wanted,
            &b.pgbench.clients,
            &[
                Config::None,
                Config::LeanFloor,
                Config::LeanReader,
                Config::Previous,
                Config::V3,
                Config::RowNotify,
                Config::Poll,
                Config::Adaptive,
                Config::SlotFloor,
                Config::Wal,
            ],
            b.pgbench.secs,
        )
    };
    // fsync-bound tps on a shared virtual disk swings from second to second: interleave
    // the configurations and pool the per-second samples of the rounds.
    let rounds = if b.quick { 1 } else { b.pgbench.rounds };
    let admin = b.db.connect().await?;
    admin
        .batch_execute(&contestants_sql())
        .await
        .ctx("installing the previous capture() and the lean floor")?;
    let (listener, listen_task) = drain_listener(&b.db.url).await?;
    let mut results: BTreeMap<(&str, usize, Config), Runs> = BTreeMap::new();
    for &script in scripts {
        let path = dir.join(format!("{script}.sql"));
        for &c in clients {
            for round in 0..rounds {
                for &config in configs {
                    prepare(b, &admin, config, script).await?;
                    let daemon = match config.mode() {
                        Some(mode) => Some(b.daemon(mode, &[]).await?),
                        None => None,
                    };
                    // The goal is the cost with the daemon delivering: one subscriber
                    // reads everything its tenant gets.
                    let subscriber = match &daemon {
                        Some(d) => Some(subscribe_and_drain(b, d.addr).await?),
                        None => None,
                    };
                    let reader = match config {
                        Config::LeanReader => Some(bare_reader(&b.db.url).await?),
                        _ => None,
                    };
                    let decoder = match config {
                        Config::SlotFloor => Some(slot_reader(b)?),
                        _ => None,
                    };
                    let measured = pgbench(b, &path, c, secs).await;
                    if let Some(mut child) = decoder {
                        let _ = child.kill().await;
                    }
                    if let Some(task) = reader {
                        task.abort();
                    }
                    let mut mode_at_end = String::new();
                    if let Some(task) = subscriber {
                        task.abort();
                    }
                    if let Some(daemon) = daemon {
                        mode_at_end = daemon.wakeup_mode().await;
                        daemon.stop().await;
                    }
                    let (tps, per_second) = measured?;
                    eprintln!(
                        "  pgbench {script} -c {c} round {round} {}: {} tps (steady {})",
                        config.key(),
                        num(tps),
                        num(median(per_second.iter().copied()))
                    );
                    let entry = results.entry((script, c, config)).or_default();
                    entry.tps.push(tps);
                    entry.per_second.extend(per_second);
                    entry.mode_at_end.push(mode_at_end);
                }
            }
        }
    }
    drop(listener);
    listen_task.abort();
    // Leave citas watched (trigger mode) for the scenarios that follow.
    leave_wal_mode(&admin).await?;
    admin
        .batch_execute(
            "DROP TRIGGER IF EXISTS bench_notify ON citas; \
             SELECT citapulse.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment')",
        )
        .await
        .ctx("re-watching citas")?;

    let mut header = vec!["script", "clients"];
    header.extend(configs.iter().map(|c| c.name()));
    let mut table = Table::new(
        format!(
            "pgbench tps (median of the per-second tps after 1.5 s, {rounds} interleaved rounds × {secs} s; ratio vs no trigger), fsync=on, synchronous_commit=on"
        ),
        &header,
    );
    let mut json_runs = Vec::new();
    for &script in scripts {
        for &c in clients {
            let none = results
                .get(&(script, c, Config::None))
                .map_or(f64::NAN, Runs::steady);
            let mut row = vec![script.to_string(), c.to_string()];
            for &config in configs {
                let Some(r) = results.get(&(script, c, config)) else {
                    row.push("–".into());
                    continue;
                };
                let steady = r.steady();
                let tag = if config == Config::Adaptive {
                    format!(", ends {}", r.mode_at_end.join("/"))
                } else {
                    String::new()
                };
                row.push(if config == Config::None {
                    num(steady)
                } else {
                    format!("{} ({}{tag})", num(steady), ratio(steady, none))
                });
                json_runs.push(json!({
                    "script": script, "clients": c, "config": config.key(),
                    "tps_per_run": r.tps.iter().map(|t| round(*t, 1)).collect::<Vec<_>>(),
                    "steady_tps": round(steady, 1),
                    "ratio_vs_none": round(steady / none, 4),
                    "mode_at_end": r.mode_at_end,
                }));
            }
            table.row(row);
        }
    }
    section.tables.push(table);
    section.notes.push(
        "Each run: TRUNCATE citas and citapulse.events, VACUUM ANALYZE, CHECKPOINT, wakeup row reset to notify, \
         daemon (if any) started fresh; pgbench -n -M prepared -j min(clients,2) -P 1."
            .into(),
    );
    section.json = json!({ "seconds_per_run": secs, "rounds": rounds, "runs": json_runs });
    Ok(section)
}
