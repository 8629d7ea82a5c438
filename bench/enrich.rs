//! One slow tenant under `[[enrich]]`: every lookup of tenant `slow` takes 2 s, against
//! `timeout_ms = 200`. Measures, on one daemon, (1) the other tenants' commit→client
//! latency and how many of their events carry their context: alone, beside a tenant
//! making the same writes with quick lookups (the control), and beside the slow tenant,
//! in alternating phases so drift hits all three; (2) how late the slow tenant's own
//! events go out, against `timeout_ms` + 100 ms. Every event of every tenant looks up a
//! value never seen before (a cache miss), so each needs a lookup connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::Bench;
use crate::client::{self, Ws, source_of};
use crate::env::Server;
use crate::error::{Context, Result, failed};
use crate::report::{Section, Summary, Table, num};

/// The entry's `timeout_ms`.
const TIMEOUT_MS: u64 = 200;
/// How long each of the slow tenant's lookups takes.
const SLOW_SECS: f64 = 2.0;
/// The tenants measured besides the slow one (their events take turns).
const OTHERS: [&str; 4] = ["quick1", "quick2", "quick3", "quick4"];
/// The slow tenant writes one event this often.
const SLOW_EVERY: Duration = Duration::from_millis(50);
/// The other tenants write one event this often (when the last has arrived).
const OTHERS_EVERY: Duration = Duration::from_millis(10);
/// How long the slow tenant's last events may take to arrive after it stops writing.
const SLOW_TAIL: Duration = Duration::from_secs(5);

/// What one phase of the other tenants measured.
struct Phase {
    latency: Summary,
    with_context: usize,
}

/// What a tenant writing beside the measured ones measured of its own events.
#[derive(Default)]
struct SlowRun {
    written: usize,
    delays_ns: Vec<u64>,
    with_context: usize,
    /// The largest `citapulse_enrich_held_events` seen while it wrote.
    held_max: f64,
}

/// A config file with the one `[[enrich]]` entry.
fn config_file(bench: &Bench) -> Result<(&'static str, String)> {
    crate::time::config_file(
        bench,
        "enrich-slow-tenant",
        &format!(
            "[[enrich]]\nkind = \"appointment\"\ncolumn = \"cliente_id\"\n\
             query = \"SELECT bench_enrich_ctx($1, $2) AS cliente_nombre\"\n\
             cache_ttl_ms = 60000\ntimeout_ms = {TIMEOUT_MS}\n"
        ),
    )
}

/// Reads frames until the event whose `cliente_id` is `tag`; whether it had context.
async fn await_tag(ws: &mut Ws, tag: &str) -> Result<bool> {
    let needle = format!("\"{tag}\"");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| failed(format!("no event {tag} within 10 s")))?;
        match frame {
            Some(Ok(Message::Text(text))) if text.contains(&needle) => {
                let v: Value =
                    serde_json::from_str(&text).map_err(|e| failed(format!("bad JSON: {e}")))?;
                return Ok(v["data"]["context"]["cliente_nombre"].is_string());
            }
            Some(Ok(_)) => {}
            other => return Err(failed(format!("socket ended waiting for {tag}: {other:?}"))),
        }
    }
}

/// `n` single inserts taking turns over the other tenants, one at a time and at most
/// one every [`OTHERS_EVERY`], each timed from before its INSERT to its event at that
/// tenant's subscriber.
async fn others(
    db: &tokio_postgres::Client,
    sockets: &mut [Ws],
    n: usize,
    label: &str,
) -> Result<Phase> {
    let mut samples = Vec::with_capacity(n);
    let mut with_context = 0;
    let mut tick = tokio::time::interval(OTHERS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        let k = i % OTHERS.len();
        let tag = format!("{label}-{i}");
        let t0 = Instant::now();
        db.execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ($1, $2, 'p1', 'pendiente')",
            &[&OTHERS[k], &tag],
        )
        .await
        .ctx("insert")?;
        if await_tag(&mut sockets[k], &tag).await? {
            with_context += 1;
        }
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    Ok(Phase {
        latency: Summary::of_ns(samples),
        with_context,
    })
}

/// `tenant` writing one event every [`SLOW_EVERY`] until `stop`, its subscriber timing
/// each from before its INSERT, and a sampler of the held-events gauge.
async fn side_tenant(
    bench: &Bench,
    server: &Server,
    (tenant, ws): (&str, &mut Ws),
    label: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<SlowRun> {
    let db = bench.db.connect().await?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let writer = {
        let sent = sent.clone();
        let (tenant, label) = (tenant.to_string(), label.to_string());
        let mut stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(SLOW_EVERY);
            let mut k = 0usize;
            while !*stop.borrow() {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let tag = format!("{label}-{k}");
                k += 1;
                lock(&sent).insert(tag.clone(), Instant::now());
                db.execute(
                    "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ($1, $2, 'p1', 'pendiente')",
                    &[&tenant, &tag],
                )
                .await
                .ctx("side tenant insert")?;
            }
            Ok::<usize, crate::error::BenchError>(k)
        }
    };
    let reader = async {
        let mut run = SlowRun::default();
        let mut tail: Option<Instant> = None;
        let mut sample = tokio::time::interval(Duration::from_millis(100));
        loop {
            let written = lock(&sent).len();
            if *stop.borrow() {
                let since = *tail.get_or_insert_with(Instant::now);
                if run.delays_ns.len() >= written || since.elapsed() > SLOW_TAIL {
                    break;
                }
            }
            tokio::select! {
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(_) => continue,
                        None => break,
                    };
                    let at = Instant::now();
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    let Some(tag) = v["data"]["row"]["cliente_id"].as_str() else { continue };
                    if let Some(t0) = lock(&sent).get(tag) {
                        run.delays_ns.push(at.duration_since(*t0).as_nanos() as u64);
                        if v["data"]["context"]["cliente_nombre"].is_string() {
                            run.with_context += 1;
                        }
                    }
                }
                _ = sample.tick() => {
                    if let Ok(held) = server.metric("citapulse_enrich_held_events").await {
                        run.held_max = run.held_max.max(held);
                    }
                }
                _ = stop.changed(), if !*stop.borrow() => {}
            }
        }
        run
    };
    let (written, mut run) = tokio::join!(writer, reader);
    run.written = written?;
    Ok(run)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The scenario.
pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("enrich");
    // Each phase writes for `--duration`; `--rounds` alternations.
    let n = (bench.duration.as_millis() / OTHERS_EVERY.as_millis()).max(10) as usize;
    let rounds = bench.rounds;
    let db = bench.db.connect().await?;
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION bench_enrich_ctx(id text, tenant text) RETURNS text \
         LANGUAGE plpgsql AS $$ BEGIN \
           IF tenant = 'slow' THEN PERFORM pg_sleep({SLOW_SECS}); END IF; \
           RETURN 'Cliente ' || id; END $$"
    ))
    .await
    .ctx("bench_enrich_ctx")?;
    let server = bench.daemon("notify", &[config_file(bench)?]).await?;
    let mut sockets = Vec::new();
    for (i, tenant) in OTHERS.iter().enumerate() {
        let token = bench.tokens.tenant(tenant)?;
        let mut ws = client::connect(server.addr, source_of(i), &token, 65_536).await?;
        client::subscribe(&mut ws, tenant).await?;
        sockets.push(ws);
    }
    // Two tenants writing beside the measured ones in turn: `steady` (quick lookups, the
    // control: same writes) and `slow`.
    let mut side = Vec::new();
    for (i, tenant) in ["steady", "slow"].into_iter().enumerate() {
        let token = bench.tokens.tenant(tenant)?;
        let mut ws =
            client::connect(server.addr, source_of(OTHERS.len() + i), &token, 65_536).await?;
        client::subscribe(&mut ws, tenant).await?;
        side.push((tenant, ws));
    }
    // The pool's connections are opened by the first lookups: not measured.
    others(&db, &mut sockets, 20, "warm").await?;
    let mut phases: [Vec<Phase>; 3] = Default::default();
    let mut runs: [SlowRun; 2] = Default::default();
    for round in 0..rounds {
        phases[0].push(others(&db, &mut sockets, n, &format!("a{round}")).await?);
        for (k, (tenant, ws)) in side.iter_mut().enumerate() {
            let (stop_tx, stop_rx) = watch::channel(false);
            let measure = async {
                let phase = others(&db, &mut sockets, n, &format!("{tenant}{round}")).await;
                let _ = stop_tx.send(true);
                phase
            };
            let label = format!("{tenant}-{round}");
            let (phase, run) = tokio::join!(
                measure,
                side_tenant(bench, &server, (tenant, ws), &label, stop_rx)
            );
            phases[k + 1].push(phase?);
            let run = run?;
            let total = &mut runs[k];
            total.written += run.written;
            total.delays_ns.extend(run.delays_ns);
            total.with_context += run.with_context;
            total.held_max = total.held_max.max(run.held_max);
        }
    }
    let metrics = server.metrics().await.unwrap_or_default();
    server.stop().await;

    let every = SLOW_EVERY.as_millis();
    let mut table = Table::new(
        format!(
            "Other tenants ({} of them, taking turns), {n} inserts per phase one every {} ms, \
             each a lookup cache miss, commit to client (median of {rounds} alternating phases)",
            OTHERS.len(),
            OTHERS_EVERY.as_millis()
        ),
        &["phase", "p50 ms", "p99 ms", "max ms", "with context"],
    );
    let mut out = serde_json::Map::new();
    let labels = [
        "alone".to_string(),
        format!("beside a tenant writing every {every} ms, lookups quick"),
        format!("beside a tenant writing every {every} ms, lookups 2 s"),
    ];
    for (label, phases) in labels.iter().zip(&phases) {
        let s = Summary::median_of(&phases.iter().map(|p| p.latency).collect::<Vec<_>>());
        let ctx: usize = phases.iter().map(|p| p.with_context).sum();
        let total = n * phases.len();
        table.row(vec![
            label.clone(),
            num(s.p50),
            num(s.p99),
            num(s.max),
            format!("{ctx} of {total}"),
        ]);
        out.insert(
            label.clone(),
            json!({"latency": s.json(), "with_context": ctx, "events": total}),
        );
    }
    section.tables.push(table);

    let bound = (TIMEOUT_MS + 100) as f64;
    let mut table = Table::new(
        format!(
            "The tenant beside them: one insert every {every} ms, timeout_ms = {TIMEOUT_MS}; \
             insert to client"
        ),
        &[
            "its lookups",
            "received",
            "with context",
            "p50 ms",
            "p99 ms",
            "max ms",
            "held events (max seen)",
        ],
    );
    for (label, run) in ["quick", "2 s"].into_iter().zip(runs) {
        let s = Summary::of_ns(run.delays_ns);
        table.row(vec![
            label.into(),
            format!("{} of {}", s.n, run.written),
            run.with_context.to_string(),
            num(s.p50),
            num(s.p99),
            num(s.max),
            format!("{}", run.held_max),
        ]);
        if s.n < run.written {
            section.notes.push(format!(
                "{} of the {label} tenant's events had not arrived {} s after it stopped writing",
                run.written - s.n,
                SLOW_TAIL.as_secs()
            ));
        }
        out.insert(
            format!("side tenant, lookups {label}"),
            json!({"written": run.written, "received": s.n, "with_context": run.with_context,
                   "delay": s.json(), "held_max": run.held_max}),
        );
    }
    section.tables.push(table);
    section.notes.push(format!(
        "goal for the slow tenant's events: at most timeout_ms + 100 = {bound} ms late"
    ));
    let reasons: serde_json::Map<String, Value> = [
        "hit",
        "fetched",
        "timeout",
        "behind",
        "queue_full",
        "failed",
    ]
    .iter()
    .map(|r| {
        let v = crate::env::metric_with_label(
            &metrics,
            "citapulse_enrich_lookups_total",
            &format!("reason=\"{r}\""),
        )
        .unwrap_or(0.0);
        ((*r).to_string(), json!(v))
    })
    .collect();
    section.notes.push(format!(
        "lookups by outcome over the run: {}",
        Value::Object(reasons.clone())
    ));
    out.insert("lookups".into(), Value::Object(reasons));
    section.json = Value::Object(out);
    Ok(section)
}
