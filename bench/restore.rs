//! `citapulse.after_restore()` on a restored log of 100 000 and 1 000 000 rows: how long
//! the one call takes, and the same log's plain `UPDATE` of every row as the floor (what
//! rewriting each row once costs, with no mapping to compute).
//!
//! The log is written as a restore into a younger cluster leaves it: every xid and
//! horizon in this cluster's future, all distinct, so every row is remapped. No daemon
//! runs (the function refuses while one is connected).

use std::time::Instant;

use serde_json::json;

use crate::Bench;
use crate::error::{Context, Result};
use crate::report::{Section, Table, num, ratio};

/// Fills `citapulse.events` with `rows` rows whose xids lie in the future.
const FILL_SQL: &str = "TRUNCATE citapulse.events; \
    INSERT INTO citapulse.events (tenant, kind, op, row_data, xid, horizon) \
    SELECT 't' || (g % 50), 'appointment', 'INSERT', jsonb_build_object('id', g, 'estado', 'pendiente'), \
           (f.base + 2 * g)::text::xid8, (f.base + 2 * g - (g % 5))::text::xid8 \
      FROM generate_series(1, $ROWS) g, \
           (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 10000000 AS base) f";

/// Times after_restore and a plain rewrite of the same rows.
pub async fn scenario(b: &Bench) -> Result<Section> {
    let mut section = Section::new("restore");
    let sizes: &[i64] = if b.quick {
        &[10_000]
    } else {
        &[100_000, 1_000_000]
    };
    let db = b.db.connect().await?;
    // after_restore refuses while a daemon is connected (the scenarios before stop theirs).
    crate::env::wait_for_daemon_sessions_to_end(&db).await?;
    let mut table = Table::new(
        "citapulse.after_restore() on a restored log, every row's xid and horizon in the future (ms, one call)",
        &[
            "rows",
            "after_restore ms",
            "rows remapped",
            "floor: UPDATE of every row ms",
            "× floor",
        ],
    );
    let mut runs = Vec::new();
    for &rows in sizes {
        let fill = FILL_SQL.replace("$ROWS", &rows.to_string());
        fill_log(&db, &fill).await?;
        let t = Instant::now();
        let remapped: i64 = db
            .query_one("SELECT remapped FROM citapulse.after_restore()", &[])
            .await
            .ctx("after_restore")?
            .get(0);
        let restore_ms = t.elapsed().as_secs_f64() * 1000.0;

        fill_log(&db, &fill).await?;
        let t = Instant::now();
        db.execute(
            "UPDATE citapulse.events SET xid = '3'::xid8, horizon = '3'::xid8",
            &[],
        )
        .await
        .ctx("the floor's UPDATE")?;
        let floor_ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "  restore {rows} rows: after_restore {} ms ({remapped} remapped), floor {} ms",
            num(restore_ms),
            num(floor_ms)
        );
        table.row(vec![
            rows.to_string(),
            num(restore_ms),
            remapped.to_string(),
            num(floor_ms),
            ratio(restore_ms, floor_ms),
        ]);
        runs.push(json!({"rows": rows, "after_restore_ms": restore_ms, "remapped": remapped, "floor_update_ms": floor_ms}));
    }
    db.batch_execute("TRUNCATE citapulse.events")
        .await
        .ctx("emptying the log")?;
    section.tables.push(table);
    section.json = json!({ "runs": runs });
    Ok(section)
}

async fn fill_log(db: &tokio_postgres::Client, fill: &str) -> Result<()> {
    db.batch_execute(fill).await.ctx("filling the log")?;
    // Its own statement: VACUUM cannot run in the implicit transaction of a batch.
    db.batch_execute("VACUUM ANALYZE citapulse.events")
        .await
        .ctx("vacuuming the log")
}
