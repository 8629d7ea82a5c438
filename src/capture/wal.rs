//! WAL capture (DESIGN.md §7): streams the logical slot with `pgoutput` and writes the
//! decoded rows to the log itself, so the application's writes carry no trigger.
//!
//! One daemon per database streams (the leader, by a session advisory lock); the others
//! check every second and take over when its session ends. A batch of whole transactions
//! is written to the log (one prepared INSERT per run of one table's rows) together with
//! the position it reaches (`citapulse.wal_confirm()`), and only then confirmed to the slot: a daemon that dies in between skips, on restart, the
//! transactions its position already covers. `citapulse.capture_mode()` marks each switch
//! in the WAL (`capture=wal N`, `capture=trigger N`); rows are captured only between a
//! `wal` and a `trigger` mark, so every transaction is captured once, by the triggers or
//! from here. After a switch back to trigger mode the leader drops the drained slot.
//! The readers (`listener`) then deliver the rows like any other log rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use pgwire_replication::config::{SslMode, TlsConfig};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::{Map, Value as Json};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use super::Context;
use super::pgoutput::{self, Message, Value};
use crate::config::Link;
use crate::db::{self, DbError};

/// The publication `capture_mode('wal')` fills.
pub const PUBLICATION: &str = "citapulse";
/// Advisory lock key of the streaming leader (any fixed number unlike the others).
const LEADER_LOCK: i64 = 7_382_917_400_000_002;
/// How often a non-leader looks for a slot to stream, and the leader for a drained one.
const TICK: Duration = Duration::from_secs(1);
/// Rows per written batch at most (whole transactions; a bigger one is spilled).
const BATCH_ROWS: usize = 5_000;
/// A transaction buffering more rows than this is written in parts, inside one database
/// transaction that commits with its last part: memory stays bounded.
const SPILL_ROWS: usize = 50_000;

const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A query on the ordinary connection failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The replication stream failed.
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    /// A message did not parse.
    #[error(transparent)]
    Parse(#[from] pgoutput::ParseError),
    /// The connection string cannot be used for replication.
    #[error("database.url: {0}")]
    Url(String),
}

impl From<tokio_postgres::Error> for WalError {
    fn from(e: tokio_postgres::Error) -> Self {
        WalError::Db(DbError::Postgres(e))
    }
}

/// Runs until shutdown: streams the slot whenever it exists and this daemon leads.
pub async fn run(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(err) = session(&ctx, &mut shutdown).await {
            tracing::warn!(error = %err, "WAL capture stopped; retrying");
        }
        ctx.metrics.wal_streaming.set(0);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// One ordinary connection: watches the slot, leads when it can.
async fn session(ctx: &Context, shutdown: &mut watch::Receiver<bool>) -> Result<(), WalError> {
    let (client, conn) = db::connect_session_as(&ctx.config, "citapulse-wal")
        .await
        .map_err(WalError::Db)?;
    let driver = tokio::spawn(conn);
    let result = watch_slot(ctx, &client, shutdown).await;
    driver.abort();
    result
}

async fn watch_slot(
    ctx: &Context,
    client: &Client,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), WalError> {
    let slot = ctx.config.capture.slot.as_str();
    loop {
        let row = client
            .query_one(
                "SELECT r.slot_name IS NOT NULL, \
                        coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn), 0)::float8, \
                        s.capture = 'wal' \
                   FROM citapulse.settings s \
                   LEFT JOIN pg_replication_slots r ON r.slot_name = $1 AND r.database = current_database()",
                &[&slot],
            )
            .await?;
        let exists: bool = row.get(0);
        ctx.metrics
            .capture_lag_bytes
            .set(row.get::<_, f64>(1) as i64);
        if exists {
            let led: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await?
                .get(0);
            if led {
                ctx.metrics.wal_streaming.set(1);
                tracing::info!(slot, "streaming the WAL capture slot");
                let result = stream(ctx, client, shutdown).await;
                ctx.metrics.wal_streaming.set(0);
                // On an error the session ends, and the lock with it.
                result?;
                client
                    .execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])
                    .await?;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

/// A relation as the stream described it, with how it is watched.
struct Relation {
    columns: Vec<pgoutput::Column>,
    /// The INSERT of this table's rows into the log (prepared; `None` if unwatched).
    insert: Option<tokio_postgres::Statement>,
    /// The watch's kind and the table's name as the log writes it.
    kind_and_table: Option<(String, String)>,
    /// Index of the tenant column; `None` with `resolved` for resolver tables.
    tenant: Option<usize>,
    /// Watched with a `[[resolvers]]` lookup (no tenant column).
    resolved: bool,
    watched: bool,
}

/// One row for the log.
struct Row {
    rel: u32,
    tenant: Option<String>,
    op: &'static str,
    /// The op bulk folding counts it under: the change's own (a moved row's halves are
    /// an UPDATE's, as in trigger mode).
    counted_as: &'static str,
    new: Option<Json>,
    old: Option<Json>,
    event_type: Option<String>,
    payload: Option<Json>,
}

/// The transaction being decoded.
struct Txn {
    /// Already written by an earlier session (its commit is below the saved position).
    skip: bool,
    rows: Vec<Row>,
    /// Rows per (relation, op, tenant); above the bulk threshold their rows are dropped
    /// and one calendar_refresh goes out at commit.
    counts: HashMap<(u32, &'static str, String), usize>,
    /// Buffered rows at which `spill_due` looks again.
    check_at: usize,
}

/// Where this stream stands.
struct Position {
    /// End of the last transaction written (or covered) by the log.
    lsn: u64,
    capturing: bool,
    mark: i64,
}

/// Decoded rows awaiting their write, and the position they reach.
#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    upto: u64,
    /// The position must be saved even without rows (a mark was passed).
    dirty: bool,
    /// Part of a spilled transaction went out in an open database transaction.
    open: bool,
}

/// Streams until an error, shutdown, or the slot was drained and dropped.
async fn stream(
    ctx: &Context,
    client: &Client,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), WalError> {
    let slot = ctx.config.capture.slot.clone();
    let threshold = ctx.config.events.bulk_threshold as usize;
    let saved = client
        .query_opt(
            "SELECT p.lsn::text, p.capturing, p.mark FROM citapulse.wal_position p WHERE p.slot = $1",
            &[&slot],
        )
        .await?;
    let mut pos = match saved {
        Some(row) => Position {
            lsn: parse_lsn(row.get(0))?,
            capturing: row.get(1),
            mark: row.get(2),
        },
        None => {
            // A slot nobody recorded (made by hand): capture if the database says so.
            let wal: bool = client
                .query_one("SELECT capture = 'wal' FROM citapulse.settings", &[])
                .await?
                .get(0);
            client
                .execute(
                    "INSERT INTO citapulse.wal_position (slot, capturing, mark) \
                     SELECT $1, $2, switches FROM citapulse.settings ON CONFLICT (slot) DO NOTHING",
                    &[&slot, &wal],
                )
                .await?;
            Position {
                lsn: 0,
                capturing: wal,
                mark: 0,
            }
        }
    };
    let write = client
        .prepare_typed(
            "SELECT citapulse.wal_confirm($1, $2::text::pg_lsn, $3, $4, $5)",
            &[Type::TEXT, Type::TEXT, Type::BOOL, Type::INT8, Type::BOOL],
        )
        .await?;

    let mut repl = ReplicationClient::connect(replication_config(ctx, pos.lsn)?).await?;
    let mut relations: HashMap<u32, Relation> = HashMap::new();
    let mut txn: Option<Txn> = None;
    let mut batch = Batch::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // Flush once the stream has nothing more ready: a batch never waits for input.
        let event = if (batch.rows.is_empty() && !batch.dirty) || txn.is_some() {
            tokio::select! {
                ev = repl.recv() => ev?,
                _ = tick.tick() => {
                    if txn.is_none() && drained(ctx, client, &slot, &pos).await? {
                        repl.stop();
                        let _ = repl.shutdown().await;
                        drop_slot(client, &slot).await?;
                        return Ok(());
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    repl.stop();
                    return Ok(());
                }
            }
        } else {
            // One poll, no timer: tokio's timers tick in milliseconds, and a zero timeout
            // cost every batch about one and a half of them.
            match repl.recv().now_or_never() {
                Some(ev) => ev?,
                None => {
                    flush(
                        ctx, client, &write, &relations, &slot, &mut pos, &mut batch, &repl,
                    )
                    .await?;
                    continue;
                }
            }
        };
        let Some(event) = event else {
            return Ok(());
        };
        tracing::trace!(?event, "wal event");
        match event {
            ReplicationEvent::Begin { final_lsn, .. } => {
                txn = Some(Txn {
                    skip: final_lsn.as_u64() < pos.lsn,
                    rows: Vec::new(),
                    counts: HashMap::new(),
                    check_at: SPILL_ROWS,
                });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::parse(&data)?;
                if let Message::Relation {
                    id,
                    namespace,
                    name,
                    columns,
                } = message
                {
                    let rel = describe(client, id, &namespace, &name, columns).await?;
                    relations.insert(id, rel);
                    continue;
                }
                let Some(t) = txn.as_mut() else { continue };
                if t.skip || !pos.capturing {
                    continue;
                }
                collect(&relations, t, message, threshold);
                if spill_due(t, threshold) {
                    batch.rows.append(&mut t.rows);
                    spill(client, &relations, &mut batch).await?;
                }
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == "citapulse" => {
                if txn.as_ref().is_some_and(|t| t.skip) {
                    continue;
                }
                if let Some((capturing, mark)) = parse_mark(&content) {
                    tracing::info!(capturing, mark, "capture mode switch reached in the WAL");
                    pos.capturing = capturing;
                    pos.mark = mark;
                    batch.dirty = true;
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let Some(mut t) = txn.take() else { continue };
                if t.skip {
                    continue;
                }
                finish(&mut t, threshold);
                batch.rows.append(&mut t.rows);
                batch.upto = end_lsn.as_u64();
                if batch.rows.is_empty() && !batch.dirty && !batch.open {
                    // Nothing of ours: confirm at once, nothing to save.
                    pos.lsn = pos.lsn.max(batch.upto);
                    repl.update_applied_lsn(end_lsn);
                } else if batch.rows.len() >= BATCH_ROWS {
                    flush(
                        ctx, client, &write, &relations, &slot, &mut pos, &mut batch, &repl,
                    )
                    .await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything before wal_end that committed has been sent: with nothing
                // pending, the slot may move on (else it would hold WAL while idle).
                if txn.is_none() && batch.rows.is_empty() && !batch.dirty && !batch.open {
                    repl.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::StoppedAt { .. } => return Ok(()),
            ReplicationEvent::Message { .. } => {}
        }
    }
}

/// Whether the slot is drained: trigger mode, and this stream is past the latest mark.
/// Also keeps `/health`'s capture mode current while streaming.
async fn drained(
    ctx: &Context,
    client: &Client,
    slot: &str,
    pos: &Position,
) -> Result<bool, WalError> {
    let row = client
        .query_one(
            "SELECT s.capture = 'wal', \
                    coalesce(s.capture = 'trigger' AND p.mark = s.switches AND NOT p.capturing, false) \
               FROM citapulse.settings s LEFT JOIN citapulse.wal_position p ON p.slot = $1",
            &[&slot],
        )
        .await?;
    ctx.health
        .capture_wal
        .store(row.get(0), std::sync::atomic::Ordering::Relaxed);
    Ok(!pos.capturing && row.get::<_, bool>(1))
}

/// Drops the drained slot once its walsender is gone (a few tries: it exits after us).
async fn drop_slot(client: &Client, slot: &str) -> Result<(), WalError> {
    for _ in 0..50 {
        let dropped: bool = client
            .query_one("SELECT citapulse.wal_drop_slot($1)", &[&slot])
            .await?
            .get(0);
        if dropped {
            tracing::info!(slot, "trigger mode: WAL capture drained, slot dropped");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Looks up how a relation is watched, and prepares the INSERT of its rows.
async fn describe(
    client: &Client,
    id: u32,
    namespace: &str,
    name: &str,
    columns: Vec<pgoutput::Column>,
) -> Result<Relation, WalError> {
    let row = client
        .query_opt(
            "SELECT w.tenant_column, w.kind, format('%I.%I', n.nspname, c.relname) \
               FROM citapulse.watches w JOIN pg_class c ON c.oid = w.tbl \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE w.tbl = $1::oid::regclass",
            &[&id],
        )
        .await?;
    let Some(row) = row else {
        tracing::warn!(table = %format!("{namespace}.{name}"), "a table in the publication citapulse is not watched: its rows are ignored (run SELECT citapulse.rewatch_all())");
        return Ok(Relation {
            columns,
            insert: None,
            kind_and_table: None,
            tenant: None,
            resolved: false,
            watched: false,
        });
    };
    let (tenant_column, kind, table): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    // The names are the database's own (format %I), the kind and table bound: nothing of
    // the stream's text is spliced into SQL.
    let insert = client
        .prepare_typed(
            &format!(
                "INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, row_data, old_data, payload, routes) \
                 SELECT x.tenant, $1, x.et, $2, x.op, x.n, x.o, x.payload, citapulse.row_routes(r.cols, x.n, x.o) \
                   FROM (SELECT u.tenant, u.op, u.et, u.payload, u.i, \
                                CASE WHEN u.n IS NULL THEN NULL ELSE to_jsonb(jsonb_populate_record(NULL::{table}, u.n)) END AS n, \
                                CASE WHEN u.o IS NULL THEN NULL ELSE to_jsonb(jsonb_populate_record(NULL::{table}, u.o)) END AS o \
                           FROM unnest($3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[], $8::jsonb[]) \
                                WITH ORDINALITY AS u(tenant, op, n, o, et, payload, i) \
                          WHERE u.tenant IS NULL OR octet_length(u.tenant) <= 255 OFFSET 0) x, \
                        (SELECT (SELECT w.route_columns FROM citapulse.watches w WHERE w.tbl = to_regclass($2)) AS cols) r \
                  ORDER BY x.i"
            ),
            &[
                Type::TEXT,
                Type::TEXT,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
                Type::JSONB_ARRAY,
                Type::JSONB_ARRAY,
                Type::TEXT_ARRAY,
                Type::JSONB_ARRAY,
            ],
        )
        .await?;
    let tenant = columns.iter().position(|col| col.name == tenant_column);
    Ok(Relation {
        tenant,
        resolved: tenant_column.is_empty(),
        watched: true,
        insert: Some(insert),
        columns,
        kind_and_table: Some((kind, table)),
    })
}

/// Adds one row message of a capturing transaction.
fn collect(relations: &HashMap<u32, Relation>, t: &mut Txn, message: Message, threshold: usize) {
    let (rel, op, new, old) = match message {
        Message::Insert { rel, new } => (rel, "INSERT", Some(new), None),
        Message::Update { rel, old, new } => (rel, "UPDATE", Some(new), old),
        Message::Delete { rel, old } => (rel, "DELETE", None, Some(old)),
        Message::Truncate { rels } => {
            for rel in rels {
                if relations.get(&rel).is_some_and(|r| r.watched) {
                    t.rows.push(Row {
                        rel,
                        tenant: None,
                        op: "TRUNCATE",
                        counted_as: "TRUNCATE",
                        new: None,
                        old: None,
                        event_type: Some("calendar_refresh".into()),
                        payload: Some(
                            serde_json::json!({"reason": "truncate", "action": "truncate"}),
                        ),
                    });
                }
            }
            return;
        }
        Message::Relation { .. } | Message::Other(_) => return,
    };
    let Some(relation) = relations.get(&rel).filter(|r| r.watched) else {
        return;
    };
    let (new_tenant, old_tenant) = match (relation.resolved, relation.tenant) {
        (true, _) => (None, None),
        (false, Some(i)) => {
            let text = |row: Option<&Vec<Value>>| match row.and_then(|v| v.get(i)) {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            };
            let old_tenant = text(old.as_ref());
            let new_tenant = match new.as_ref().and_then(|v| v.get(i)) {
                Some(Value::UnchangedToast) => old_tenant.clone(),
                _ => text(new.as_ref()),
            };
            (new_tenant, old_tenant)
        }
        (false, None) => return,
    };
    // JSON only for rows that are kept (not folded).
    let cols = &relation.columns;
    let old_json = || old.as_deref().map(|v| row_json(cols, v, None));
    let new_json = || new.as_deref().map(|v| row_json(cols, v, old.as_deref()));
    // A row moved to another tenant (old row known: REPLICA IDENTITY FULL): its removal
    // from the old tenant with the old row only, then its arrival in the new one with the
    // new row only, as capture() logs them; both count as the UPDATE they are.
    if op == "UPDATE" && old.is_some() && !relation.resolved && new_tenant != old_tenant {
        let moved = || Some(serde_json::json!({"moved": true}));
        if let Some(tenant) = old_tenant {
            let key = (rel, op, tenant);
            push(t, threshold, key, "DELETE", || (None, old_json(), moved()));
        }
        if let Some(tenant) = new_tenant {
            let key = (rel, op, tenant);
            push(t, threshold, key, "INSERT", || (new_json(), None, moved()));
        }
        return;
    }
    let tenant = match (relation.resolved, new.is_some(), new_tenant, old_tenant) {
        (true, ..) => None,
        (false, true, Some(tenant), _) | (false, false, _, Some(tenant)) => Some(tenant),
        // No tenant: skipped, as the triggers skip it.
        _ => return,
    };
    match tenant {
        Some(tenant) => push(t, threshold, (rel, op, tenant), op, || {
            (new_json(), old_json(), None)
        }),
        None => t.rows.push(Row {
            rel,
            tenant: None,
            op,
            counted_as: op,
            new: new_json(),
            old: old_json(),
            event_type: None,
            payload: None,
        }),
    }
}

/// Buffers one row of a tenant, logged as `op`, counted for bulk folding under `key`
/// (relation, op, tenant); `rows` gives its (new, old, payload) if it is kept.
fn push(
    t: &mut Txn,
    threshold: usize,
    key: (u32, &'static str, String),
    op: &'static str,
    rows: impl FnOnce() -> (Option<Json>, Option<Json>, Option<Json>),
) {
    let (rel, counted_as, tenant) = key.clone();
    let n = t.counts.entry(key).or_default();
    *n += 1;
    // Its earlier rows are dropped in one pass later (`drop_folded`): dropping them
    // here would walk the buffer once per folded tenant.
    if *n > threshold {
        return;
    }
    let (new, old, payload) = rows();
    t.rows.push(Row {
        rel,
        tenant: Some(tenant),
        op,
        counted_as,
        new,
        old,
        event_type: None,
        payload,
    });
}

/// Drops the buffered rows of every (relation, op, tenant) above the threshold: one pass.
fn drop_folded(t: &mut Txn, threshold: usize) {
    let Txn { rows, counts, .. } = t;
    let folded: HashSet<(u32, &str, &str)> = counts
        .iter()
        .filter(|(_, n)| **n > threshold)
        .map(|((rel, op, tenant), _)| (*rel, *op, tenant.as_str()))
        .collect();
    if folded.is_empty() {
        return;
    }
    rows.retain(|r| {
        r.event_type.is_some()
            || r.tenant
                .as_deref()
                .is_none_or(|tenant| !folded.contains(&(r.rel, r.counted_as, tenant)))
    });
}

/// Whether the buffered rows of a transaction go to the database now: when, with folded
/// tenants' rows dropped, [`SPILL_ROWS`] remain. A pass that keeps them buffered waits for
/// another half of that before the next, so passes cost a few steps per row (linear) and
/// the buffer stays under one and a half times [`SPILL_ROWS`].
fn spill_due(t: &mut Txn, threshold: usize) -> bool {
    if t.rows.len() < t.check_at {
        return false;
    }
    drop_folded(t, threshold);
    if t.rows.len() >= SPILL_ROWS {
        t.check_at = SPILL_ROWS;
        return true;
    }
    t.check_at = t.rows.len() + SPILL_ROWS / 2;
    false
}

/// Appends one calendar_refresh per (relation, op, tenant) above the threshold.
fn finish(t: &mut Txn, threshold: usize) {
    drop_folded(t, threshold);
    let mut bulk: Vec<_> = t.counts.drain().filter(|(_, n)| *n > threshold).collect();
    bulk.sort();
    for ((rel, op, tenant), n) in bulk {
        t.rows.push(Row {
            rel,
            tenant: Some(tenant),
            op,
            counted_as: op,
            new: None,
            old: None,
            event_type: Some("calendar_refresh".into()),
            payload: Some(
                serde_json::json!({"reason": "bulk", "rows": n, "action": op.to_lowercase()}),
            ),
        });
    }
}

/// A tuple as a JSON object of the columns' text forms (json/jsonb parsed), which
/// `jsonb_populate_record` types in `wal_write`. An unchanged TOASTed value comes from
/// the old row (REPLICA IDENTITY FULL sends it whole); without one the key is left out.
fn row_json(columns: &[pgoutput::Column], values: &[Value], old: Option<&[Value]>) -> Json {
    let mut map = Map::with_capacity(columns.len());
    for (i, (col, value)) in columns.iter().zip(values).enumerate() {
        let value = match value {
            Value::UnchangedToast => match old.and_then(|o| o.get(i)) {
                Some(v @ (Value::Text(_) | Value::Null)) => v,
                _ => continue,
            },
            v => v,
        };
        let json = match value {
            Value::Text(s) if col.type_oid == JSON_OID || col.type_oid == JSONB_OID => {
                serde_json::from_str(s).unwrap_or_else(|_| Json::String(s.clone()))
            }
            Value::Text(s) => Json::String(s.clone()),
            _ => Json::Null,
        };
        map.insert(col.name.clone(), json);
    }
    Json::Object(map)
}

/// Writes the batch and the position it reaches in one transaction, then confirms it.
#[allow(clippy::too_many_arguments)]
async fn flush(
    ctx: &Context,
    client: &Client,
    confirm: &tokio_postgres::Statement,
    relations: &HashMap<u32, Relation>,
    slot: &str,
    pos: &mut Position,
    batch: &mut Batch,
    repl: &ReplicationClient,
) -> Result<(), WalError> {
    let upto = batch.upto.max(pos.lsn);
    let rows = std::mem::take(&mut batch.rows);
    let lsn = Lsn::from_u64(upto).to_pg_string();
    let wake = !rows.is_empty() || batch.open;
    let params: [&(dyn ToSql + Sync); 5] = [&slot, &lsn, &pos.capturing, &pos.mark, &wake];
    let n = write_rows(
        client,
        relations,
        &rows,
        !batch.open,
        Some((confirm, &params)),
    )
    .await?;
    batch.open = false;
    batch.dirty = false;
    tracing::trace!(rows = rows.len(), written = n, "wal batch written");
    pos.lsn = upto;
    repl.update_applied_lsn(Lsn::from_u64(upto));
    ctx.metrics.wal_rows.inc_by(n);
    Ok(())
}

/// Writes part of a transaction too big to hold, in a database transaction left open
/// until the rest is written (`flush` commits it). The saved position does not move.
async fn spill(
    client: &Client,
    relations: &HashMap<u32, Relation>,
    batch: &mut Batch,
) -> Result<(), WalError> {
    let rows = std::mem::take(&mut batch.rows);
    write_rows(client, relations, &rows, !batch.open, None).await?;
    batch.open = true;
    Ok(())
}

type Pending<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Inserts rows into the log, one statement per run of one table's rows (so ids follow
/// commit order), opening the transaction first if `begin`, and with `finish` saving the
/// position and committing. Every statement is sent at once (pipelined): one round trip.
/// Returns how many rows were written.
async fn write_rows(
    client: &Client,
    relations: &HashMap<u32, Relation>,
    rows: &[Row],
    begin: bool,
    finish: Option<(&tokio_postgres::Statement, &[&(dyn ToSql + Sync)])>,
) -> Result<u64, WalError> {
    struct Run<'a> {
        insert: &'a tokio_postgres::Statement,
        kind: &'a str,
        table: &'a str,
        tenants: Vec<Option<&'a str>>,
        ops: Vec<&'a str>,
        news: Vec<Option<&'a Json>>,
        olds: Vec<Option<&'a Json>>,
        types: Vec<Option<&'a str>>,
        payloads: Vec<Option<&'a Json>>,
    }
    let mut runs = Vec::new();
    for run in rows.chunk_by(|a, b| a.rel == b.rel) {
        let Some(relation) = relations.get(&run[0].rel) else {
            continue;
        };
        let (Some(insert), Some((kind, table))) = (&relation.insert, &relation.kind_and_table)
        else {
            continue;
        };
        runs.push(Run {
            insert,
            kind,
            table,
            tenants: run.iter().map(|r| r.tenant.as_deref()).collect(),
            ops: run.iter().map(|r| r.op).collect(),
            news: run.iter().map(|r| r.new.as_ref()).collect(),
            olds: run.iter().map(|r| r.old.as_ref()).collect(),
            types: run.iter().map(|r| r.event_type.as_deref()).collect(),
            payloads: run.iter().map(|r| r.payload.as_ref()).collect(),
        });
    }
    // Dropped by the INSERT's filter; counted as the triggers' path counts them: every
    // row, also those a bulk refresh stands for.
    let oversized: i64 = runs
        .iter()
        .flat_map(|r| r.tenants.iter().zip(&r.types).zip(&r.payloads))
        .filter(|((t, _), _)| t.is_some_and(|t| t.len() > 255))
        .map(|((_, ty), payload)| match (ty, payload) {
            (Some("calendar_refresh"), Some(p)) => p["rows"].as_i64().unwrap_or(1),
            _ => 1,
        })
        .sum();
    let oversized = i32::try_from(oversized).unwrap_or(i32::MAX);
    let run_params: Vec<[&(dyn ToSql + Sync); 8]> = runs
        .iter()
        .map(|r| {
            [
                &r.kind as &(dyn ToSql + Sync),
                &r.table,
                &r.tenants,
                &r.ops,
                &r.news,
                &r.olds,
                &r.types,
                &r.payloads,
            ]
        })
        .collect();
    if oversized > 0 {
        // Before the pipeline: a statement given as text prepares first (a round trip).
        client
            .execute(
                "SELECT citapulse.count_oversized_tenant() FROM generate_series(1, $1)",
                &[&oversized],
            )
            .await?;
    }
    let mut pending: Vec<(bool, Pending<'_>)> = Vec::new();
    if begin {
        pending.push((
            false,
            Box::pin(async { client.batch_execute("BEGIN").await.map(|_| 0) }),
        ));
    }
    for (run, params) in runs.iter().zip(&run_params) {
        pending.push((true, Box::pin(client.execute(run.insert, params))));
    }
    if let Some((confirm, params)) = finish {
        pending.push((false, Box::pin(client.execute(confirm, params))));
        pending.push((
            false,
            Box::pin(async { client.batch_execute("COMMIT").await.map(|_| 0) }),
        ));
    }
    let (counted, futures): (Vec<bool>, Vec<_>) = pending.into_iter().unzip();
    let results = futures_util::future::try_join_all(futures).await?;
    Ok(counted
        .iter()
        .zip(results)
        .filter(|(c, _)| **c)
        .map(|(_, n)| n)
        .sum())
}

/// `capture=wal 3` → (true, 3).
fn parse_mark(content: &[u8]) -> Option<(bool, i64)> {
    let text = std::str::from_utf8(content).ok()?;
    let (mode, mark) = text.strip_prefix("capture=")?.split_once(' ')?;
    let mark = mark.parse().ok()?;
    match mode {
        "wal" => Some((true, mark)),
        "trigger" => Some((false, mark)),
        _ => None,
    }
}

fn parse_lsn(text: &str) -> Result<u64, WalError> {
    Lsn::parse(text)
        .map(Lsn::as_u64)
        .map_err(|e| WalError::Url(format!("bad position {text}: {e}")))
}

/// The stream's TLS settings: the same libpq parameters as every other connection.
fn replication_tls(security: &crate::pgtls::Security) -> TlsConfig {
    use crate::pgtls::{Roots, SslMode as Mode};
    let mode = match (security.mode, &security.roots) {
        (Mode::Disable, _) => SslMode::Disable,
        (Mode::Allow | Mode::Prefer, _) => SslMode::Prefer,
        // libpq: require with a root file checks the chain, as verify-ca.
        (Mode::Require, Some(_)) | (Mode::VerifyCa, _) => SslMode::VerifyCa,
        (Mode::Require, None) => SslMode::Require,
        (Mode::VerifyFull, _) => SslMode::VerifyFull,
    };
    TlsConfig {
        mode,
        // `system` (and no file) means the built-in Mozilla roots.
        ca_pem_path: match &security.roots {
            Some(Roots::File(path)) => Some(path.clone()),
            _ => None,
        },
        sni_hostname: None,
        client_cert_pem_path: security.cert.clone(),
        client_key_pem_path: security.key.clone(),
    }
}

/// The replication connection, from `database.session_url` or `database.url` (first host).
fn replication_config(ctx: &Context, start: u64) -> Result<ReplicationConfig, WalError> {
    let security = db::security(&ctx.config, Link::Session).map_err(WalError::Db)?;
    if matches!(
        security.mode,
        crate::pgtls::SslMode::VerifyCa | crate::pgtls::SslMode::VerifyFull
    ) && security.roots.is_none()
    {
        return Err(WalError::Db(DbError::Tls {
            key: ctx.config.database.endpoint(Link::Session).1,
            source: crate::pgtls::TlsError::NoRoots(security.mode.as_str()),
        }));
    }
    let pg = db::pg_config(&ctx.config, Link::Session).map_err(WalError::Db)?;
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let slot = ctx.config.capture.slot.clone();
    let mut cfg = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => {
            ReplicationConfig::new(host.clone(), user, password, dbname, slot, PUBLICATION)
                .with_port(port)
        }
        Some(tokio_postgres::config::Host::Unix(dir)) => ReplicationConfig::unix(
            dir.to_string_lossy().into_owned(),
            port,
            user,
            password,
            dbname,
            slot,
            PUBLICATION,
        ),
        None => return Err(WalError::Url("no host".into())),
    };
    cfg = cfg
        .with_start_lsn(Lsn::from_u64(start))
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_application_name("citapulse-wal")
        .with_tls(replication_tls(&security))
        // Text forms the log's connection parses back the same way.
        .with_options("-c datestyle=ISO,MDY -c intervalstyle=postgres -c extra_float_digits=3");
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(tenant: Option<usize>) -> HashMap<u32, Relation> {
        let columns = ["id", "negocio_id", "data"]
            .iter()
            .zip([20, 25, JSONB_OID])
            .map(|(n, t)| pgoutput::Column {
                name: (*n).into(),
                type_oid: t,
            })
            .collect();
        HashMap::from([(
            7,
            Relation {
                columns,
                insert: None,
                kind_and_table: None,
                tenant,
                resolved: false,
                watched: true,
            },
        )])
    }

    fn insert(id: &str, tenant: &str) -> Message {
        Message::Insert {
            rel: 7,
            new: vec![
                Value::Text(id.into()),
                Value::Text(tenant.into()),
                Value::Text(r#"{"a": [1]}"#.into()),
            ],
        }
    }

    fn txn() -> Txn {
        Txn {
            skip: false,
            rows: Vec::new(),
            counts: HashMap::new(),
            check_at: SPILL_ROWS,
        }
    }

    #[test]
    fn rows_carry_their_tenant_and_typed_json() {
        let rels = rel(Some(1));
        let mut t = txn();
        collect(&rels, &mut t, insert("1", "t1"), 100);
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.rows[0].tenant.as_deref(), Some("t1"));
        assert_eq!(
            t.rows[0].new,
            Some(serde_json::json!({"id": "1", "negocio_id": "t1", "data": {"a": [1]}}))
        );
    }

    fn moved(id: &str, from: &str, to: &str) -> Message {
        let row = |tenant: &str| {
            vec![
                Value::Text(id.into()),
                Value::Text(tenant.into()),
                Value::Text("{}".into()),
            ]
        };
        Message::Update {
            rel: 7,
            old: Some(row(from)),
            new: row(to),
        }
    }

    #[test]
    fn a_row_moved_to_another_tenant_leaves_one_and_reaches_the_other() {
        let rels = rel(Some(1));
        let mut t = txn();
        collect(&rels, &mut t, moved("1", "a", "b"), 100);
        collect(&rels, &mut t, moved("2", "a", "a"), 100);
        finish(&mut t, 100);
        let rows: Vec<_> = t
            .rows
            .iter()
            .map(|r| {
                (
                    r.tenant.clone().unwrap(),
                    r.op,
                    r.new.as_ref().map(|n| n["negocio_id"].clone()),
                    r.old.as_ref().map(|o| o["negocio_id"].clone()),
                    r.payload.clone(),
                )
            })
            .collect();
        let moved = Some(serde_json::json!({"moved": true}));
        assert_eq!(
            rows,
            vec![
                ("a".into(), "DELETE", None, Some("a".into()), moved.clone()),
                ("b".into(), "INSERT", Some("b".into()), None, moved),
                (
                    "a".into(),
                    "UPDATE",
                    Some("a".into()),
                    Some("a".into()),
                    None
                ),
            ]
        );
    }

    #[test]
    fn a_bulk_move_folds_for_both_tenants() {
        let rels = rel(Some(1));
        let mut t = txn();
        for i in 0..4 {
            collect(&rels, &mut t, moved(&i.to_string(), "a", "b"), 3);
        }
        finish(&mut t, 3);
        let refreshes: Vec<_> = t
            .rows
            .iter()
            .map(|r| {
                (
                    r.tenant.clone().unwrap(),
                    r.op,
                    r.payload.clone().unwrap()["rows"].clone(),
                )
            })
            .collect();
        assert_eq!(
            refreshes,
            [
                ("a".to_string(), "UPDATE", 4.into()),
                ("b".to_string(), "UPDATE", 4.into())
            ]
        );
    }

    #[test]
    fn a_tenant_over_the_threshold_becomes_one_refresh() {
        let rels = rel(Some(1));
        let mut t = txn();
        for i in 0..5 {
            collect(&rels, &mut t, insert(&i.to_string(), "big"), 3);
        }
        collect(&rels, &mut t, insert("9", "small"), 3);
        finish(&mut t, 3);
        let kinds: Vec<_> = t
            .rows
            .iter()
            .map(|r| (r.tenant.clone().unwrap(), r.event_type.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("small".to_string(), None),
                ("big".to_string(), Some("calendar_refresh".to_string()))
            ]
        );
        assert_eq!(t.rows[1].payload.as_ref().unwrap()["rows"], 5);
    }

    #[test]
    fn many_folded_tenants_are_dropped_in_passes_over_the_buffer_not_one_per_tenant() {
        let rels = rel(Some(1));
        let mut t = txn();
        let mut spills = 0;
        // 30 000 tenants of 3 rows (folded at 2) and one tenant of 2 rows.
        for i in 0..30_000 {
            for _ in 0..3 {
                collect(&rels, &mut t, insert(&i.to_string(), &format!("t{i}")), 2);
                if spill_due(&mut t, 2) {
                    spills += 1;
                    t.rows.clear();
                }
            }
        }
        collect(&rels, &mut t, insert("a", "small"), 2);
        collect(&rels, &mut t, insert("b", "small"), 2);
        finish(&mut t, 2);
        // Every buffered row belonged to a folded tenant: nothing was written early.
        assert_eq!(spills, 0);
        let rows: Vec<_> = t.rows.iter().filter(|r| r.event_type.is_none()).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.tenant.as_deref() == Some("small")));
        assert_eq!(t.rows.len(), 30_002);
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row() {
        let cols = &rel(Some(1))[&7].columns;
        let old = vec![
            Value::Text("1".into()),
            Value::Text("t".into()),
            Value::Text("{}".into()),
        ];
        let new = vec![
            Value::Text("1".into()),
            Value::Text("t".into()),
            Value::UnchangedToast,
        ];
        assert_eq!(
            row_json(cols, &new, Some(&old))["data"],
            serde_json::json!({})
        );
        assert!(row_json(cols, &new, None).get("data").is_none());
    }

    #[test]
    fn marks() {
        assert_eq!(parse_mark(b"capture=wal 3"), Some((true, 3)));
        assert_eq!(parse_mark(b"capture=trigger 12"), Some((false, 12)));
        assert_eq!(parse_mark(b"capture=x 1"), None);
        assert_eq!(parse_mark(b"probe"), None);
    }
}
