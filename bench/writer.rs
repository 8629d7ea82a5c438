//! Paced writers: real `citas` INSERTs whose `cliente_id` is a sequence number, with the
//! time just before COMMIT is sent and the time COMMIT was acknowledged recorded per
//! sequence number on the run's one monotonic clock.
//!
//! Each commit is `BEGIN; INSERT …` (one round trip) and then `COMMIT` (one round trip),
//! so the two timestamps bracket exactly the commit and its WAL flush. The schedule is
//! open-loop: writer `w` of `n` aims at `start + (w + k·n) / rate`; a writer that falls
//! behind writes back-to-back, and the achieved rate is reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::ns_since;
use crate::env;
use crate::error::{Context, Result, failed};

/// Send and acknowledgement times of every commit of a run, indexed by sequence number.
pub struct Timeline {
    /// The run's clock origin (clients timestamp against it too).
    pub base: Instant,
    sent: Box<[AtomicU64]>,
    acked: Box<[AtomicU64]>,
    next: AtomicU32,
}

impl Timeline {
    /// Room for `capacity` commits (sequence numbers 1..=capacity).
    pub fn new(capacity: usize) -> Arc<Self> {
        let slots = || (0..=capacity).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Self {
            base: Instant::now(),
            sent: slots(),
            acked: slots(),
            next: AtomicU32::new(1),
        })
    }

    /// The next sequence number, or `None` when the timeline is full.
    fn claim(&self) -> Option<u32> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        (usize::try_from(seq).ok()? < self.sent.len()).then_some(seq)
    }

    fn mark(slots: &[AtomicU64], seq: u32, at: u64) {
        if let Some(slot) = slots.get(seq as usize) {
            slot.store(at, Ordering::Relaxed);
        }
    }

    /// When COMMIT was about to be sent (ns since base; 0 if never).
    pub fn sent(&self, seq: u32) -> u64 {
        self.sent
            .get(seq as usize)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// When COMMIT was acknowledged (ns since base; 0 if never).
    pub fn acked(&self, seq: u32) -> u64 {
        self.acked
            .get(seq as usize)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

/// What to write.
#[derive(Clone)]
pub struct Load {
    /// Database URL.
    pub url: String,
    /// Target table (`citas`, `citas_bare`, `citas_floor`).
    pub table: &'static str,
    /// Tenant of every row.
    pub tenant: String,
    /// Writer connections.
    pub writers: usize,
    /// Commits per second over all writers; 0 means as fast as they can.
    pub rate: f64,
    /// How long to write.
    pub duration: Duration,
    /// Rows per INSERT statement.
    pub rows: usize,
}

/// What the writers did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Committed transactions.
    pub commits: u64,
    /// Rows committed.
    pub rows: u64,
    /// From the first scheduled commit to the last acknowledgement.
    pub elapsed: Duration,
}

impl Written {
    /// Achieved commits per second.
    pub fn rate(&self) -> f64 {
        self.commits as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the writers to completion (bounded by `load.duration` and the timeline's size).
pub async fn run(load: &Load, timeline: &Arc<Timeline>) -> Result<Written> {
    let mut clients = Vec::with_capacity(load.writers);
    for _ in 0..load.writers.max(1) {
        clients.push(env::connect(&load.url).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for (w, client) in clients.into_iter().enumerate() {
        let load = load.clone();
        let timeline = timeline.clone();
        tasks.push(tokio::spawn(async move {
            write_loop(client, w, &load, &timeline, start).await
        }));
    }
    let mut commits = 0;
    for task in tasks {
        commits += task
            .await
            .map_err(|e| failed(format!("writer task: {e}")))??;
    }
    Ok(Written {
        commits,
        rows: commits * load.rows as u64,
        elapsed: start.elapsed(),
    })
}

async fn write_loop(
    client: tokio_postgres::Client,
    w: usize,
    load: &Load,
    timeline: &Timeline,
    start: Instant,
) -> Result<u64> {
    let end = start + load.duration;
    let period = (load.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / load.rate));
    let writers = load.writers.max(1) as u32;
    let mut commits = 0u64;
    let mut k: u32 = 0;
    loop {
        if let Some(period) = period {
            let due = start + period * (w as u32 + k * writers);
            if due >= end {
                break;
            }
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        } else if Instant::now() >= end {
            break;
        }
        let Some(seq) = timeline.claim() else { break };
        client
            .batch_execute(&insert_sql(load, seq))
            .await
            .ctx("BEGIN; INSERT")?;
        Timeline::mark(&timeline.sent, seq, ns_since(timeline.base));
        client.batch_execute("COMMIT").await.ctx("COMMIT")?;
        Timeline::mark(&timeline.acked, seq, ns_since(timeline.base));
        commits += 1;
        k += 1;
    }
    Ok(commits)
}

fn insert_sql(load: &Load, seq: u32) -> String {
    let row = format!(
        "('{}', '{seq}', 'p1', 's1', current_date, '09:00', '09:30', 'pendiente')",
        load.tenant
    );
    let mut sql = format!(
        "BEGIN; INSERT INTO {} (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) VALUES {row}",
        load.table
    );
    for _ in 1..load.rows {
        sql.push_str(", ");
        sql.push_str(&row);
    }
    sql
}
