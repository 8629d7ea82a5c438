//! Production scale: (1) 100 000- and 1 000 000-row INSERT, UPDATE and DELETE on the
//! watched `citas` against the same statements on an unwatched copy (trigger mode, no
//! daemon: the statement's own cost); (2) a daemon started over 100 000 appointments of
//! the current day while another tenant writes: `/health` answer times, that tenant's
//! commit→client latency, the runtime's stall gauge, against the same start over an
//! empty day (same run); (3) 20 000 reminders due at the same second in one tenant and
//! one in another: when the last is sent, how late the other tenant's one arrives.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::Bench;
use crate::client::{self, source_of};
use crate::env::{Server, http_get};
use crate::error::{Context, Result, failed};
use crate::report::{Section, Summary, Table, median, num, ratio, round};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Seconds one statement takes.
async fn timed(db: &tokio_postgres::Client, sql: &str) -> Result<f64> {
    let t = Instant::now();
    db.batch_execute(sql).await.ctx(sql.to_string())?;
    Ok(t.elapsed().as_secs_f64())
}

/// INSERT, UPDATE, a move of every row to another tenant (an UPDATE of the tenant
/// column) and DELETE of `n` rows of `tenants` tenants on `table`: seconds each.
async fn statements(
    db: &tokio_postgres::Client,
    table: &str,
    n: usize,
    tenant: &str,
) -> Result<[f64; 4]> {
    let insert = timed(
        db,
        &format!(
            "INSERT INTO {table} (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) \
             SELECT {tenant}, 'c' || g, 'p' || (g % 50), 's1', current_date, '10:00', '10:30', 'pendiente' \
               FROM generate_series(1, {n}) g"
        ),
    )
    .await?;
    let update = timed(db, &format!("UPDATE {table} SET estado = 'confirmada'")).await?;
    let moved = timed(
        db,
        &format!("UPDATE {table} SET negocio_id = negocio_id || 'm'"),
    )
    .await?;
    let delete = timed(db, &format!("DELETE FROM {table}")).await?;
    db.batch_execute("TRUNCATE citapulse.inbox; CHECKPOINT")
        .await
        .ctx("cleaning the inbox")?;
    Ok([insert, update, moved, delete])
}

/// An unwatched copy of `citas`, and a floor: a copy whose bare statement triggers write
/// every row's JSON (and an UPDATE's old row, paired by position) to a plain table, with
/// none of citapulse's checks, folding or wake-up.
const FLOOR_SQL: &str = "
    TRUNCATE citas;
    DROP TABLE IF EXISTS citas_plain, citas_floor, floor_log;
    CREATE TABLE citas_plain (LIKE citas INCLUDING ALL);
    CREATE TABLE citas_floor (LIKE citas INCLUDING ALL);
    CREATE TABLE floor_log (id bigserial PRIMARY KEY, r jsonb, o jsonb);
    CREATE OR REPLACE FUNCTION floor_ins() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO floor_log (r) SELECT to_jsonb(n) FROM new_rows n; RETURN NULL; END $$;
    CREATE OR REPLACE FUNCTION floor_del() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO floor_log (o) SELECT to_jsonb(o) FROM old_rows o; RETURN NULL; END $$;
    CREATE OR REPLACE FUNCTION floor_upd() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO floor_log (r, o)
           SELECT to_jsonb(n.x), to_jsonb(o.x)
             FROM (SELECT x, row_number() OVER () AS i FROM new_rows x) n
             JOIN (SELECT x, row_number() OVER () AS i FROM old_rows x) o ON o.i = n.i;
         RETURN NULL; END $$;
    CREATE TRIGGER floor_ins AFTER INSERT ON citas_floor REFERENCING NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION floor_ins();
    CREATE TRIGGER floor_del AFTER DELETE ON citas_floor REFERENCING OLD TABLE AS old_rows
      FOR EACH STATEMENT EXECUTE FUNCTION floor_del();
    CREATE TRIGGER floor_upd AFTER UPDATE ON citas_floor REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION floor_upd();
    SET statement_timeout = '10min';
";

/// Bulk statements, watched vs unwatched.
async fn bulk(bench: &Bench, section: &mut Section) -> Result<Value> {
    let db = bench.db.connect().await?;
    db.batch_execute(FLOOR_SQL)
        .await
        .ctx("the unwatched and floor copies")?;
    let rounds = if bench.quick { 1 } else { 3 };
    let mut cases: Vec<(String, usize, &str)> = vec![
        (
            "20 tenants (each folded)".into(),
            if bench.quick { 10_000 } else { 100_000 },
            "'t' || (g % 20)",
        ),
        (
            "one tenant per row (every row an event)".into(),
            if bench.quick { 10_000 } else { 100_000 },
            "'t' || g",
        ),
    ];
    if !bench.quick {
        cases.push((
            "20 tenants, 1 000 000 rows".into(),
            1_000_000,
            "'t' || (g % 20)",
        ));
    }
    let mut table = Table::new(
        format!(
            "Bulk statements in trigger mode: seconds, median of {rounds}: watched vs unwatched (ratio); floor: a bare statement trigger logging every row's JSON"
        ),
        &[
            "rows",
            "tenants",
            "INSERT",
            "UPDATE",
            "tenant move (UPDATE)",
            "DELETE",
            "floor I/U/M/D",
        ],
    );
    let mut out = serde_json::Map::new();
    for (label, n, tenant) in &cases {
        let mut plain = Vec::new();
        let mut watched = Vec::new();
        let mut floor = Vec::new();
        for _ in 0..rounds {
            plain.push(statements(&db, "citas_plain", *n, tenant).await?);
            watched.push(statements(&db, "citas", *n, tenant).await?);
            floor.push(statements(&db, "citas_floor", *n, tenant).await?);
            db.batch_execute("TRUNCATE floor_log")
                .await
                .ctx("floor log")?;
        }
        let med = |runs: &[[f64; 4]], i: usize| median(runs.iter().map(|r| r[i]));
        let mut cells = vec![n.to_string(), label.clone()];
        let mut json = serde_json::Map::new();
        for (i, op) in ["insert", "update", "tenant_move", "delete"]
            .iter()
            .enumerate()
        {
            let (p, w, f) = (med(&plain, i), med(&watched, i), med(&floor, i));
            cells.push(format!("{:.2} vs {:.2} ({})", w, p, ratio(w, p)));
            json.insert(
                (*op).into(),
                json!({"watched_s": round(w, 3), "unwatched_s": round(p, 3), "ratio": round(w / p, 2),
                       "floor_s": round(f, 3), "floor_ratio": round(f / p, 2)}),
            );
        }
        cells.push(format!(
            "{} / {} / {} / {}",
            ratio(med(&floor, 0), med(&plain, 0)),
            ratio(med(&floor, 1), med(&plain, 1)),
            ratio(med(&floor, 2), med(&plain, 2)),
            ratio(med(&floor, 3), med(&plain, 3))
        ));
        table.row(cells);
        out.insert(format!("{n} rows, {label}"), Value::Object(json));
    }
    section.tables.push(table);
    db.batch_execute("DROP TABLE citas_plain, citas_floor, floor_log")
        .await
        .ctx("dropping the copies")?;
    Ok(Value::Object(out))
}

/// Commit→client round trips of tenant `writer` for `secs`, one at a time, while `/health`
/// is asked every 50 ms; returns (writes, health answers, worst stall gauge seen).
async fn under_watch(
    bench: &Bench,
    server: &Server,
    secs: Duration,
) -> Result<(Summary, Summary, f64)> {
    let db = bench.db.connect().await?;
    let token = bench.tokens.tenant("writer")?;
    let mut ws = client::connect(server.addr, source_of(2), &token, 65_536).await?;
    client::subscribe(&mut ws, "writer").await?;
    let addr = server.addr;
    let until = Instant::now() + secs;
    let health = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < until {
            let t = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/health"))
                .await
                .is_ok_and(|r| r.is_ok_and(|(status, _)| status == 200));
            samples.push(if ok {
                t.elapsed().as_nanos() as u64
            } else {
                5_000_000_000
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples
    });
    let mut writes = Vec::new();
    let mut stall: f64 = 0.0;
    let mut i = 0u64;
    while Instant::now() < until {
        let tag = format!("w{i}");
        i += 1;
        let t0 = Instant::now();
        db.execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ('writer', $1, 'p1', 'pendiente')",
            &[&tag],
        )
        .await
        .ctx("insert")?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .map_err(|_| failed("no event within 30 s"))?;
            if let Some(Ok(Message::Text(text))) = frame
                && text.contains(&format!("\"{tag}\""))
            {
                break;
            }
        }
        writes.push(t0.elapsed().as_nanos() as u64);
        if i.is_multiple_of(50) {
            stall = stall.max(
                server
                    .metric("citapulse_runtime_stall_seconds")
                    .await
                    .unwrap_or(0.0),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stall = stall.max(
        server
            .metric("citapulse_runtime_stall_seconds")
            .await
            .unwrap_or(0.0),
    );
    let health = health
        .await
        .map_err(|e| failed(format!("health poller: {e}")))?;
    Ok((Summary::of_ns(writes), Summary::of_ns(health), stall))
}

/// A start over a busy day vs an empty one.
async fn busy_day(bench: &Bench, section: &mut Section) -> Result<Value> {
    let (appointments, secs) = if bench.quick {
        (10_000, Duration::from_secs(4))
    } else {
        (100_000, Duration::from_secs(30))
    };
    let db = bench.db.connect().await?;
    let mut table = Table::new(
        format!(
            "Daemon started over {appointments} appointments of today (reminders [60, 15]), another tenant writing for {} s",
            secs.as_secs()
        ),
        &[
            "day",
            "writer p50 ms",
            "writer p99 ms",
            "/health p99 ms",
            "/health max ms",
            "stall gauge max ms",
            "late reminders recorded",
        ],
    );
    let mut out = serde_json::Map::new();
    for (label, n) in [("empty (floor)", 0), ("busy", appointments)] {
        // Written with the triggers off: the point is what the daemon finds at start.
        db.batch_execute(&format!(
            "TRUNCATE citas; TRUNCATE citapulse.reminders_sent; SET session_replication_role = replica; \
             INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT 't' || (g % 50), 'c' || g, 'p' || (g % 40), current_date, \
                    make_time(g % 24, g % 60, 0), 'pendiente' \
               FROM generate_series(1, {n}) g; \
             SET session_replication_role = DEFAULT; ANALYZE citas"
        ))
        .await
        .ctx("loading the day")?;
        let server = bench.daemon("notify", &[]).await?;
        let (writes, health, stall) = under_watch(bench, &server, secs).await?;
        let late = server
            .metric("citapulse_reminders_late_total")
            .await
            .unwrap_or(0.0);
        table.row(vec![
            label.into(),
            num(writes.p50),
            num(writes.p99),
            num(health.p99),
            num(health.max),
            num(stall * 1000.0),
            format!("{late}"),
        ]);
        out.insert(
            label.into(),
            json!({"writes": writes.json(), "health": health.json(),
                   "stall_max_ms": round(stall * 1000.0, 1), "late_recorded": late}),
        );
        server.stop().await;
    }
    db.batch_execute("TRUNCATE citas; TRUNCATE citapulse.reminders_sent")
        .await
        .ctx("cleaning up")?;
    section.tables.push(table);
    Ok(Value::Object(out))
}

/// 20 000 reminders due together in one tenant, one in another.
async fn due_together(bench: &Bench, section: &mut Section) -> Result<Value> {
    let busy = if bench.quick { 2_000 } else { 20_000 };
    let db = bench.db.connect().await?;
    db.batch_execute("TRUNCATE citas; TRUNCATE citapulse.reminders_sent")
        .await
        .ctx("cleaning")?;
    let file =
        crate::time::config_file(bench, "reminders15", "[reminders]\nminutes_before = [15]\n")?;
    let server = bench
        .daemon(
            "notify",
            &[file, ("CITAPULSE_LIMITS__QUEUE_LEN", "100000".to_string())],
        )
        .await?;
    let mut quiet = client::connect(
        server.addr,
        source_of(3),
        &bench.tokens.tenant("quiet")?,
        65_536,
    )
    .await?;
    client::subscribe(&mut quiet, "quiet").await?;
    let mut loud = client::connect(
        server.addr,
        source_of(4),
        &bench.tokens.tenant("busy")?,
        1 << 20,
    )
    .await?;
    client::subscribe(&mut loud, "busy").await?;
    // One statement: all start at the same second, 15 minutes and 8 s from now.
    let due: f64 = db
        .query_one(
            &format!(
                "WITH x AS (SELECT date_trunc('second', now() AT TIME ZONE 'UTC') + interval '15 min 8 s' AS x), \
                      ins AS (INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
                              SELECT CASE WHEN g = {busy} / 2 THEN 'quiet' ELSE 'busy' END, 'c' || g, 'p1', x::date, x::time, 'pendiente' \
                                FROM generate_series(0, {busy}) g, x RETURNING 1) \
                 SELECT extract(epoch FROM ((SELECT x FROM x) AT TIME ZONE 'UTC') - interval '15 minutes')::float8 \
                   FROM (SELECT count(*) FROM ins) c"
            ),
            &[],
        )
        .await
        .ctx("inserting the appointments")?
        .get(0);
    let quiet_task = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(60), quiet.next()).await {
                Ok(Some(Ok(Message::Text(text)))) if text.contains("\"cita_reminder\"") => {
                    return Some(unix_now());
                }
                Ok(Some(Ok(_))) => {}
                _ => return None,
            }
        }
    });
    let mut received = 0usize;
    let mut last = 0.0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while received < busy && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), loud.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if text.contains("\"cita_reminder\"") {
                    received += 1;
                    last = unix_now();
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let quiet_at = quiet_task
        .await
        .map_err(|e| failed(format!("quiet client: {e}")))?;
    server.stop().await;
    db.batch_execute("TRUNCATE citas; TRUNCATE citapulse.reminders_sent")
        .await
        .ctx("cleaning up")?;
    let all_in = last - due;
    let other = quiet_at.map(|t| t - due);
    let mut table = Table::new(
        format!("{busy} reminders due at the same second in one tenant, one in another"),
        &[
            "busy tenant's received",
            "last received, s after due",
            "other tenant's, ms after due",
        ],
    );
    table.row(vec![
        format!("{received} of {busy}"),
        format!("{all_in:.2}"),
        other.map_or("not received".into(), |s| num(s * 1000.0)),
    ]);
    section.tables.push(table);
    Ok(
        json!({"busy": busy, "received": received, "last_after_due_s": round(all_in, 3),
              "other_after_due_ms": other.map(|s| round(s * 1000.0, 1))}),
    )
}

/// The scenario.
pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("scale");
    let bulk = bulk(bench, &mut section).await?;
    let day = busy_day(bench, &mut section).await?;
    let due = due_together(bench, &mut section).await?;
    section.json = json!({"bulk": bulk, "busy_day": day, "due_together": due});
    Ok(section)
}
