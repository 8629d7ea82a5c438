//! Issue 21: time and context. (1) Reminders over 100 000 future appointments of 1 000
//! tenants: the CPU the reminder leader costs at idle (daemon and its PostgreSQL backend,
//! against the same daemon with reminders off), and how late each of a few hundred
//! reminders falling due during the run reaches a subscriber. (2) What an `[[enrich]]`
//! lookup adds to an event's delivery when it is cached.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::Bench;
use crate::client::{self, source_of};
use crate::env::{Server, cpu_seconds};
use crate::error::{Context, Result, failed};
use crate::report::{Section, Summary, Table, num, round};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// A config file with `body`, for settings the environment cannot express well.
pub(crate) fn config_file(bench: &Bench, name: &str, body: &str) -> Result<(&'static str, String)> {
    let path = bench.out_dir.join(format!("{name}.toml"));
    std::fs::write(&path, body).ctx(format!("writing {}", path.display()))?;
    let path = std::fs::canonicalize(&path).ctx("config path")?;
    Ok(("CITAPULSE_CONFIG", path.display().to_string()))
}

/// CPU seconds of the daemon and of its reminder leader's backend.
async fn reminder_cpu(server: &Server, db: &tokio_postgres::Client) -> (f64, f64) {
    let backend: Option<i32> = db
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'citapulse-reminders' LIMIT 1",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    let pg = backend
        .and_then(|pid| cpu_seconds(pid as u32))
        .unwrap_or(0.0);
    (server.cpu_seconds(), pg)
}

/// Reminders: idle cost and lateness.
async fn reminders(bench: &Bench, section: &mut Section) -> Result<Value> {
    let (appointments, tenants, due_soon, idle) = if bench.quick {
        (2_000, 20, 20, Duration::from_secs(3))
    } else {
        (100_000, 1_000, 300, Duration::from_secs(30))
    };
    let db = bench.db.connect().await?;
    // Written with the triggers off (session_replication_role): the point is the
    // appointments the reminder scan reads, not 100 000 events.
    db.batch_execute(&format!(
        "TRUNCATE citas; SET session_replication_role = replica; \
         INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
         SELECT 't' || (g % {tenants}), 'c' || g, 'p' || (g % 50), current_date + 1 + (g % 60), \
                make_time(8 + g % 10, (g * 7) % 60, 0), 'pendiente' \
           FROM generate_series(1, {appointments}) g; \
         SET session_replication_role = DEFAULT; ANALYZE citas"
    ))
    .await
    .ctx("loading appointments")?;
    let mut out = serde_json::Map::new();
    let mut table = Table::new(
        format!(
            "Reminders: {appointments} future appointments of {tenants} tenants, idle for {} s",
            idle.as_secs()
        ),
        &[
            "daemon",
            "daemon CPU % of a core",
            "reminder backend CPU % of a core",
            "total",
        ],
    );
    for (label, minutes) in [
        ("reminders off (floor)", "[]"),
        ("reminders [60, 15]", "[60, 15]"),
    ] {
        let file = config_file(
            bench,
            "reminders",
            &format!("[reminders]\nminutes_before = {minutes}\n"),
        )?;
        let server = bench.daemon("notify", &[file]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (d0, p0) = reminder_cpu(&server, &db).await;
        let t0 = Instant::now();
        tokio::time::sleep(idle).await;
        let (d1, p1) = reminder_cpu(&server, &db).await;
        let secs = t0.elapsed().as_secs_f64();
        let (daemon, pg) = ((d1 - d0) / secs * 100.0, (p1 - p0) / secs * 100.0);
        table.row(vec![label.into(), num(daemon), num(pg), num(daemon + pg)]);
        out.insert(
            label.into(),
            json!({"daemon_cpu_pct": round(daemon, 3), "backend_cpu_pct": round(pg, 3)}),
        );
        server.stop().await;
    }
    section.tables.push(table);

    // Lateness: `due_soon` appointments of tenant `hot` whose 15-minute reminders fall
    // due one every 50 ms, from 6 s after they are written (a scan every 5 s that looks 15 s
    // ahead has them all in memory before they fall due; one written less than a scan
    // interval before its due time can be up to that late).
    let file = config_file(bench, "reminders15", "[reminders]\nminutes_before = [15]\n")?;
    let server = bench.daemon("notify", &[file]).await?;
    let token = bench.tokens.tenant("hot")?;
    let mut ws = client::connect(server.addr, source_of(0), &token, 65_536).await?;
    client::subscribe(&mut ws, "hot").await?;
    let rows = db
        .query(
            &format!(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
                 SELECT 'hot', 'c' || g, 'p1', x::date, x::time, 'pendiente' \
                   FROM generate_series(1, {due_soon}) g, \
                        LATERAL (SELECT (now() AT TIME ZONE 'UTC') + make_interval(mins => 15, secs => 6 + g * 0.05) AS x) s \
                 RETURNING id, extract(epoch FROM ((fecha + hora_inicio) AT TIME ZONE 'UTC') - interval '15 minutes')::float8"
            ),
            &[],
        )
        .await
        .ctx("inserting due appointments")?;
    let due: std::collections::HashMap<i64, f64> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut late = Vec::new();
    let deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_millis(50 * due_soon as u64);
    while late.len() < due.len() && Instant::now() < deadline {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = frame else {
            continue;
        };
        let at = unix_now();
        if !text.contains("\"cita_reminder\"") {
            continue;
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| failed(format!("bad JSON: {e}")))?;
        if let Some(d) = v["data"]["row"]["id"].as_i64().and_then(|id| due.get(&id)) {
            late.push(((at - d) * 1e9).max(0.0) as u64);
        }
    }
    server.stop().await;
    let s = Summary::of_ns(late);
    let mut t = Table::new(
        format!("Reminder delivery: {due_soon} reminders falling due 50 ms apart"),
        &["received", "p50 ms after due", "p99 ms", "max ms"],
    );
    t.row(vec![
        format!("{} of {due_soon}", s.n),
        num(s.p50),
        num(s.p99),
        num(s.max),
    ]);
    section.tables.push(t);
    out.insert("lateness".into(), s.json());
    db.batch_execute("TRUNCATE citas")
        .await
        .ctx("cleaning up")?;
    Ok(Value::Object(out))
}

/// Commit→client latency of `n` single inserts, one at a time.
async fn round_trips(server: &Server, bench: &Bench, n: usize) -> Result<Summary> {
    let db = bench.db.connect().await?;
    let token = bench.tokens.tenant("hot")?;
    let mut ws = client::connect(server.addr, source_of(1), &token, 65_536).await?;
    client::subscribe(&mut ws, "hot").await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let tag = format!("rt{i}");
        let t0 = Instant::now();
        db.execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ('hot', $1, 'p1', 'pendiente')",
            &[&tag],
        )
        .await
        .ctx("insert")?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .map_err(|_| failed("no event within 10 s"))?;
            if let Some(Ok(Message::Text(text))) = frame
                && text.contains(&format!("\"{tag}\""))
            {
                break;
            }
        }
        // Only the time after the commit was acknowledged would be cleaner, but both
        // configurations pay the same commit: the difference is what enrichment adds.
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    Ok(Summary::of_ns(samples))
}

/// Enrichment on a cache hit.
async fn enrichment(bench: &Bench, section: &mut Section) -> Result<Value> {
    let n = if bench.quick { 50 } else { 1_000 };
    let db = bench.db.connect().await?;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS profesionales (id text PRIMARY KEY, nombre text); \
         INSERT INTO profesionales VALUES ('p1', 'Ana') ON CONFLICT DO NOTHING",
    )
    .await
    .ctx("profesionales")?;
    let mut table = Table::new(
        format!("Enrichment on a cache hit: {n} sequential inserts, commit to client"),
        &["configuration", "p50 ms", "p99 ms", "p50 added"],
    );
    let mut out = serde_json::Map::new();
    let mut base = f64::NAN;
    // Alternating twice: drift hits both.
    let mut runs: Vec<(String, Vec<Summary>)> = vec![
        ("no [[enrich]]".into(), Vec::new()),
        ("[[enrich]] profesional_id (cached)".into(), Vec::new()),
    ];
    for _ in 0..2 {
        for (k, (_, results)) in runs.iter_mut().enumerate() {
            let extra: Vec<(&str, String)> = if k == 0 {
                Vec::new()
            } else {
                vec![config_file(
                    bench,
                    "enrich",
                    "[[enrich]]\nkind = \"appointment\"\ncolumn = \"profesional_id\"\n\
                     query = \"SELECT nombre AS profesional_nombre FROM profesionales WHERE id = $1\"\n\
                     cache_ttl_ms = 3600000\ntimeout_ms = 500\n",
                )?]
            };
            let server = bench.daemon("notify", &extra).await?;
            let s = round_trips(&server, bench, n).await?;
            results.push(s);
            server.stop().await;
        }
    }
    for (label, results) in &runs {
        let s = Summary::median_of(results);
        if base.is_nan() {
            base = s.p50;
        }
        table.row(vec![
            label.clone(),
            num(s.p50),
            num(s.p99),
            num(s.p50 - base),
        ]);
        out.insert(label.clone(), s.json());
    }
    section.tables.push(table);
    Ok(Value::Object(out))
}

/// The scenario.
pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("time");
    let reminders = reminders(bench, &mut section).await?;
    let enrich = enrichment(bench, &mut section).await?;
    section.json = json!({"reminders": reminders, "enrichment": enrich});
    Ok(section)
}
