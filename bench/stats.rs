//! Scenario 6: statistics. The recompute time of the default stats query (exactly as
//! the daemon wraps and runs it) for tenants of 1 k, 100 k and 1 M rows, with the
//! example schema's index and with a covering one; and the stats queries the daemon
//! actually issues under a high write rate to one tenant (coalescing).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use citapulse_testkit::wire::metric_value;
use serde_json::json;
use tokio::sync::watch;
use tokio_postgres::types::{ToSql, Type};

use crate::Bench;
use crate::client;
use crate::error::{Context, Result, failed};
use crate::report::{Section, Table, median, num, round};
use crate::writer::{self, Load, Timeline};

/// The daemon's `stats.min_interval_ms` default.
const MIN_INTERVAL_MS: f64 = 250.0;

/// Loads `rows` appointments for `tenant` without firing triggers.
async fn load_tenant(admin: &tokio_postgres::Client, tenant: &str, rows: i64) -> Result<()> {
    admin
        .batch_execute("SET session_replication_role = replica")
        .await
        .ctx("disabling triggers for the load")?;
    let loaded = admin
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) \
             SELECT $1, 'c' || g, 'p' || (g % 20), 's1', current_date - (g % 365)::int, '09:00', '09:30', \
                    (ARRAY['pendiente','confirmada','atendida','cancelada'])[1 + g % 4] \
               FROM generate_series(1, $2::bigint) g",
            &[&tenant, &rows],
        )
        .await
        .ctx(format!("loading {rows} rows for {tenant}"));
    admin
        .batch_execute("SET session_replication_role = origin")
        .await
        .ctx("re-enabling triggers")?;
    loaded.map(|_| ())
}

/// Wall times of one statement (2 warm-up runs first): median, min, max in ms.
async fn time_statement(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    runs: usize,
) -> Result<(f64, f64, f64)> {
    for _ in 0..2 {
        client
            .query_opt(stmt, params)
            .await
            .ctx("warming the stats query")?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        client
            .query_opt(stmt, params)
            .await
            .ctx("running the stats query")?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    Ok((median(times.into_iter()), min, max))
}

/// The scan nodes of the wrapped query's plan for one tenant, e.g. "Bitmap Heap Scan
/// on citas; Index Scan Backward using events_pkey on events e".
async fn plan_scans(client: &tokio_postgres::Client, tenant: &str, today: &str) -> Result<String> {
    let sql = format!(
        "EXPLAIN {}",
        citapulse::stats::wrapped_query(citapulse::config::DEFAULT_STATS_QUERY)
            .replace("$1", &format!("'{tenant}'"))
            .replace("$2", &format!("'{today}'"))
            .replace("$3", "9223372036854775807")
    );
    let plan: Vec<String> = client
        .query(&sql, &[])
        .await
        .ctx("EXPLAIN of the stats query")?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let mut scans: Vec<String> = plan
        .iter()
        .filter(|l| l.contains("Scan"))
        .map(|l| {
            let node = l.split("  (cost").next().unwrap_or(l);
            node.trim().trim_start_matches("->").trim().to_string()
        })
        .collect();
    scans.dedup();
    Ok(scans.join("; "))
}

/// Scenario 6.
pub async fn scenario(b: &Bench) -> Result<Section> {
    let mut section = Section::new("stats");
    let sizes: &[(&str, i64)] = if b.quick {
        &[("st_100", 100), ("st_1k", 1_000)]
    } else {
        &[("st_1k", 1_000), ("st_100k", 100_000), ("st_1m", 1_000_000)]
    };
    let admin = b.db.connect().await?;
    let loaded = Instant::now();
    for &(tenant, rows) in sizes {
        load_tenant(&admin, tenant, rows).await?;
    }
    admin
        .batch_execute("VACUUM ANALYZE citas")
        .await
        .ctx("VACUUM ANALYZE citas")?;
    let load_secs = loaded.elapsed().as_secs_f64();
    let stmt = admin
        .prepare_typed(
            &citapulse::stats::wrapped_query(citapulse::config::DEFAULT_STATS_QUERY),
            &[Type::TEXT, Type::TEXT, Type::INT8],
        )
        .await
        .ctx("preparing the stats query")?;
    let raw = admin
        .prepare_typed(
            citapulse::config::DEFAULT_STATS_QUERY,
            &[Type::TEXT, Type::TEXT],
        )
        .await
        .ctx("preparing the bare stats query")?;
    let today: String = admin
        .query_one("SELECT current_date::text", &[])
        .await
        .ctx("reading today")?
        .get(0);
    let log_rows: i64 = admin
        .query_one("SELECT count(*) FROM citapulse.events", &[])
        .await
        .ctx("counting the log")?
        .get(0);
    let mut table = Table::new(
        format!(
            "Recompute time of the default stats query, ms (prepared, warm cache; `as run` = wrapped the way the daemon runs it, \
             with the `as_of` lookup on citapulse.events, which holds {log_rows} rows here)"
        ),
        &[
            "tenant rows",
            "index",
            "as run: median",
            "min",
            "max",
            "stats.query alone: median",
            "plan",
        ],
    );
    let mut json_rows = Vec::new();
    let bound = i64::MAX;
    for covering in [false, true] {
        if covering {
            for sql in [
                "CREATE INDEX IF NOT EXISTS citas_bench_covering ON citas (negocio_id) INCLUDE (fecha, estado)",
                "VACUUM ANALYZE citas",
            ] {
                admin.batch_execute(sql).await.ctx(sql)?;
            }
        }
        let index = if covering {
            "(negocio_id) INCLUDE (fecha, estado)"
        } else {
            "(negocio_id, fecha) [example schema]"
        };
        for &(tenant, rows) in sizes {
            let runs = if rows >= 1_000_000 { 7 } else { 20 };
            let (med, min, max) =
                time_statement(&admin, &stmt, &[&tenant, &today, &bound], runs).await?;
            let (alone, _, _) = time_statement(&admin, &raw, &[&tenant, &today], runs).await?;
            let plan = plan_scans(&admin, tenant, &today).await?;
            table.row(vec![
                rows.to_string(),
                index.into(),
                num(med),
                num(min),
                num(max),
                num(alone),
                plan.clone(),
            ]);
            json_rows.push(
                json!({"rows": rows, "index": index, "median_ms": round(med, 3),
                                  "min_ms": round(min, 3), "max_ms": round(max, 3),
                                  "stats_query_alone_median_ms": round(alone, 3),
                                  "log_rows": log_rows, "plan": plan}),
            );
        }
    }
    admin
        .batch_execute("DROP INDEX IF EXISTS citas_bench_covering")
        .await
        .ctx("dropping the covering index")?;
    section.tables.push(table);

    // Coalescing under a high write rate to one tenant.
    let (writers, rate, rows, secs) = if b.quick {
        (2, 100.0, 10, 1.0)
    } else {
        (8, 1000.0, 10, 5.0)
    };
    let daemon = b.daemon("adaptive", &[]).await?;
    let coalesce = async {
        let mut subs = client::connect_many(daemon.addr, &b.tokens, 1, 0, 1, 16 * 1024, |_| {
            "st_hot".into()
        })
        .await?;
        let ws = subs.pop().ok_or_else(|| failed("no subscriber"))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let timeline = Timeline::new((rate * secs * 1.2) as usize + 100);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client::collect(
            ws,
            timeline.base,
            Arc::new(AtomicU64::new(0)),
            stop_rx,
            1000,
        ));
        let before = daemon.metrics().await?;
        let load = Load {
            url: b.db.url.clone(),
            table: "citas",
            tenant: "st_hot".into(),
            writers,
            rate,
            duration: Duration::from_secs_f64(secs),
            rows,
        };
        let written = writer::run(&load, &timeline).await?;
        // Let the trailing edge land.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let after = daemon.metrics().await?;
        let _ = stop_tx.send(true);
        let got = task
            .await
            .map_err(|e| failed(format!("client task: {e}")))?;
        let delta = |name: &str| metric_value(&after, name) - metric_value(&before, name);
        let window = written.elapsed.as_secs_f64() + 0.6;
        Ok::<_, crate::error::BenchError>((
            written,
            delta("citapulse_stats_queries_total"),
            got.stats.len(),
            delta("citapulse_stats_query_seconds_sum")
                / delta("citapulse_stats_query_seconds_count"),
            window,
        ))
    }
    .await;
    daemon.stop().await;
    let (written, queries, stats_msgs, mean_query_s, window) = coalesce?;
    let changes_per_s = written.rows as f64 / written.elapsed.as_secs_f64();
    let qps = queries / window;
    let mut co = Table::new(
        "Coalescing: one tenant under a high write rate, stats.min_interval_ms = 250 (bound: 4 queries/s)",
        &[
            "changes/s (achieved)",
            "commits/s",
            "stats queries",
            "queries/s",
            "stats messages/s at the client",
            "mean query ms",
            "bound",
        ],
    );
    co.row(vec![
        num(changes_per_s),
        num(written.rate()),
        num(queries),
        num(qps),
        num(stats_msgs as f64 / window),
        num(mean_query_s * 1e3),
        num(1000.0 / MIN_INTERVAL_MS),
    ]);
    section.tables.push(co);
    section.notes.push(format!(
        "tenants loaded with triggers disabled in {load_secs:.1} s; rows spread over 365 days and the four estados"
    ));
    section.json = json!({
        "recompute": json_rows,
        "coalescing": {
            "target_changes_per_s": rate * rows as f64,
            "achieved_changes_per_s": round(changes_per_s, 1),
            "achieved_commits_per_s": round(written.rate(), 1),
            "window_s": round(window, 3),
            "stats_queries": queries,
            "stats_queries_per_s": round(qps, 3),
            "stats_messages_at_client": stats_msgs,
            "mean_query_ms": round(mean_query_s * 1e3, 3),
            "bound_per_s": 1000.0 / MIN_INTERVAL_MS,
        },
    });
    Ok(section)
}
