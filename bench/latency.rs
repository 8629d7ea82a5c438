//! Scenarios 1–3 (commit→client latency against the floor and the Node.js baseline) and
//! the per-mode latency of issue 9.
//!
//! One run: connect the subscribers, start the writers, timestamp every event at every
//! client on the same clock as the writers' commits, wait until every delivery arrived
//! (or a bounded drain), and read the server's CPU time around the whole of it.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::Bench;
use crate::client::{self, Received, ns_since, parse_seq};
use crate::env::{RelayMode, Server, own_cpu_seconds};
use crate::error::{Context, Result, failed};
use crate::report::{Section, Summary, Table, median, num, ratio, round};
use crate::writer::{self, Load, Timeline};

/// The longest a run waits for its last deliveries after the writers stopped.
const DRAIN: Duration = Duration::from_secs(3);
/// Background tenants with one subscriber each (1 000 tenants with subscribers in all).
const BACKGROUND_TENANTS: usize = 999;

/// Who delivers the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A bare tokio-postgres LISTEN connection in the harness (no server).
    Floor,
    /// The citapulse daemon in its default configuration (`wakeup.mode = adaptive`).
    Citapulse,
    /// The citapulse daemon with `wakeup.mode = notify` pinned.
    CitapulseNotify,
    /// The Node.js baseline.
    Node,
    /// The bare Rust relay of NOTIFY payloads (`crate::relay`, what pg_eventserv does).
    Relay,
    /// The keyed relay: empty NOTIFYs, one read by key per wake-up (`crate::relay`).
    RelayKeyed,
    /// The bare relay writing every socket from the NOTIFY's task (`crate::relay`).
    RelayDirect,
    /// The bare relay holding each write's first frame (`--relay-coalesce-ms`).
    RelayCoalesce,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Floor => "floor (bare LISTEN)",
            Target::Citapulse => "citapulse (default: adaptive)",
            Target::CitapulseNotify => "citapulse (notify pinned)",
            Target::Node => "Node.js (pg + ws)",
            Target::Relay => "bare relay (NOTIFY payload)",
            Target::RelayKeyed => "keyed relay (empty NOTIFY, read by key)",
            Target::RelayDirect => "direct-write relay (NOTIFY payload, no task per socket)",
            Target::RelayCoalesce => "coalescing relay (bare, each write's first frame held)",
        }
    }

    fn is_citapulse(self) -> bool {
        matches!(self, Target::Citapulse | Target::CitapulseNotify)
    }

    fn key(self) -> &'static str {
        match self {
            Target::Floor => "floor",
            Target::Citapulse => "citapulse",
            Target::CitapulseNotify => "citapulse_notify",
            Target::Node => "node",
            Target::Relay => "relay",
            Target::RelayKeyed => "relay_keyed",
            Target::RelayDirect => "relay_direct",
            Target::RelayCoalesce => "relay_coalesce",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Target::Floor => "citas_floor",
            Target::Citapulse | Target::CitapulseNotify => "citas",
            Target::Node => "citas_bare",
            Target::Relay | Target::RelayDirect | Target::RelayCoalesce => "citas_relay_row",
            Target::RelayKeyed => "citas_relay_keyed",
        }
    }
}

/// One run's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Who delivers.
    pub target: Target,
    /// Commits per second (0 = as fast as the writers can).
    pub rate: f64,
    /// Writer connections.
    pub writers: usize,
    /// Subscribers on the written tenant.
    pub subscribers: usize,
    /// Writing time.
    pub duration: Duration,
}

/// One run's measurements.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Commits made.
    pub commits: u64,
    /// Achieved commits per second.
    pub achieved: f64,
    /// Deliveries expected (commits × subscribers).
    pub expected: u64,
    /// Deliveries received before the drain ended.
    pub received: u64,
    /// Latency from just before COMMIT was sent.
    pub from_send: Summary,
    /// Latency from COMMIT acknowledged (0 when the client had it first).
    pub from_ack: Summary,
    /// Deliveries that reached the client before the writer saw its acknowledgement.
    pub before_ack: u64,
    /// Server CPU seconds during the run (NaN for the floor).
    pub server_cpu: f64,
    /// Harness (clients + writers) CPU seconds during the run.
    pub client_cpu: f64,
    /// Median ack-clock latency of the first and last fifth of the run (growing lag?).
    pub early_p50: f64,
    /// See `early_p50`.
    pub late_p50: f64,
    /// `stats` messages the subscribers got.
    pub stats_messages: u64,
    /// citapulse: the triggers' wake-up mode when the run ended (per round, joined).
    pub end_mode: String,
    /// Subscribers the server closed during the run (e.g. slow-consumer 4008).
    pub closed: usize,
    /// Per commit, its first delivery to any subscriber (ack clock): the server's way
    /// from the commit to its first socket write, plus one client's read.
    pub first: Summary,
    /// Per commit, from its first delivery to its last (over every subscriber that got
    /// it): the fan-out, server and harness together.
    pub spread: Summary,
    /// citapulse: the mean of its own clock from a notification's arrival to its events
    /// queued for every subscriber (`citapulse_wakeup_to_queued_seconds`), ms; NaN for
    /// the others.
    pub queued_mean: f64,
    /// citapulse: the mean round trip of its move-and-read statement
    /// (`citapulse_log_read_seconds`), ms; NaN for the others.
    pub read_mean: f64,
}

impl Outcome {
    /// Server CPU seconds per 100 000 deliveries.
    pub fn cpu_per_100k(&self) -> f64 {
        if self.received == 0 {
            f64::NAN
        } else {
            self.server_cpu / self.received as f64 * 100_000.0
        }
    }

    fn client_cpu_per_100k(&self) -> f64 {
        if self.received == 0 {
            f64::NAN
        } else {
            self.client_cpu / self.received as f64 * 100_000.0
        }
    }

    /// The median of every figure over several rounds.
    fn median_of(runs: &[Outcome]) -> Outcome {
        let m = |f: fn(&Outcome) -> f64| median(runs.iter().map(f));
        Outcome {
            commits: runs.iter().map(|r| r.commits).sum(),
            achieved: m(|r| r.achieved),
            expected: runs.iter().map(|r| r.expected).sum(),
            received: runs.iter().map(|r| r.received).sum(),
            from_send: Summary::median_of(&runs.iter().map(|r| r.from_send).collect::<Vec<_>>()),
            from_ack: Summary::median_of(&runs.iter().map(|r| r.from_ack).collect::<Vec<_>>()),
            before_ack: runs.iter().map(|r| r.before_ack).sum(),
            server_cpu: runs.iter().map(|r| r.server_cpu).sum(),
            client_cpu: runs.iter().map(|r| r.client_cpu).sum(),
            early_p50: m(|r| r.early_p50),
            late_p50: m(|r| r.late_p50),
            stats_messages: runs.iter().map(|r| r.stats_messages).sum(),
            closed: runs.iter().map(|r| r.closed).sum(),
            first: Summary::median_of(&runs.iter().map(|r| r.first).collect::<Vec<_>>()),
            spread: Summary::median_of(&runs.iter().map(|r| r.spread).collect::<Vec<_>>()),
            queued_mean: m(|r| r.queued_mean),
            read_mean: m(|r| r.read_mean),
            end_mode: runs
                .iter()
                .map(|r| r.end_mode.as_str())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    fn json(&self) -> Value {
        json!({
            "commits": self.commits,
            "achieved_commits_per_s": round(self.achieved, 1),
            "deliveries_expected": self.expected,
            "deliveries_received": self.received,
            "from_ack": self.from_ack.json(),
            "from_send": self.from_send.json(),
            "deliveries_before_ack": self.before_ack,
            "server_cpu_s": round(self.server_cpu, 3),
            "server_cpu_s_per_100k_deliveries": round(self.cpu_per_100k(), 4),
            "client_cpu_s_per_100k_deliveries": round(self.client_cpu_per_100k(), 4),
            "early_p50_ms": round(self.early_p50, 4),
            "late_p50_ms": round(self.late_p50, 4),
            "stats_messages": self.stats_messages,
            "wakeup_mode_at_end": self.end_mode,
            "subscribers_closed_by_server": self.closed,
            "first_delivery": self.first.json(),
            "fan_out_spread": self.spread.json(),
            "daemon_wakeup_to_queued_mean_ms": round(self.queued_mean, 4),
            "daemon_log_read_mean_ms": round(self.read_mean, 4),
        })
    }
}

/// Runs one measurement against `server` (None for the floor) on a fresh `tenant`.
pub async fn run(b: &Bench, spec: Spec, server: Option<&Server>, tenant: &str) -> Result<Outcome> {
    let secs = spec.duration.as_secs_f64();
    let capacity = if spec.rate > 0.0 {
        (spec.rate * secs * 1.1) as usize + 1000
    } else {
        (30_000.0 * secs) as usize + 1000
    };
    let timeline = Timeline::new(capacity);
    let base = timeline.base;
    let counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let per_client = capacity.min(2_000_000 / spec.subscribers.max(1));

    let mut listener_client = None;
    let mut tasks = Vec::new();
    let subscribers = match (spec.target, server) {
        (Target::Floor, _) => {
            let (client, task) =
                floor_listener(&b.db.url, base, counter.clone(), stop_rx.clone()).await?;
            listener_client = Some(client);
            tasks.push(task);
            1
        }
        (_, Some(server)) => {
            let clients = client::connect_many(
                server.addr,
                &b.tokens,
                spec.subscribers,
                0,
                64,
                16 * 1024,
                |_| tenant.to_string(),
            )
            .await?;
            for ws in clients {
                tasks.push(tokio::spawn(client::collect(
                    ws,
                    base,
                    counter.clone(),
                    stop_rx.clone(),
                    per_client,
                )));
            }
            spec.subscribers
        }
        (_, None) => return Err(failed("a server target needs a server")),
    };
    // Let the subscription's stats snapshot settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let cpu0 = server.map_or(f64::NAN, Server::cpu_seconds);
    let own0 = own_cpu_seconds();
    let load = Load {
        url: b.db.url.clone(),
        table: spec.target.table(),
        tenant: tenant.to_string(),
        writers: spec.writers,
        rate: spec.rate,
        duration: spec.duration,
        rows: 1,
    };
    let written = writer::run(&load, &timeline).await?;
    let expected = written.commits * subscribers as u64;
    let deadline = Instant::now() + DRAIN;
    while counter.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu1 = server.map_or(f64::NAN, Server::cpu_seconds);
    let own1 = own_cpu_seconds();
    let _ = stop_tx.send(true);
    let mut received = Vec::with_capacity(tasks.len());
    for task in tasks {
        received.push(
            task.await
                .map_err(|e| failed(format!("client task: {e}")))?,
        );
    }
    drop(listener_client);
    Ok(analyse(
        &timeline,
        &received,
        written.commits,
        written.rate(),
        expected,
        cpu1 - cpu0,
        own1 - own0,
    ))
}

fn analyse(
    timeline: &Timeline,
    received: &[Received],
    commits: u64,
    achieved: f64,
    expected: u64,
    server_cpu: f64,
    client_cpu: f64,
) -> Outcome {
    // The first tenth of the commits is warm-up (connections, caches, the first stats).
    let warm = (commits / 10) as u32;
    let fifth = ((commits.saturating_sub(u64::from(warm))) / 5) as u32;
    let mut from_send = Vec::new();
    let mut from_ack = Vec::new();
    let mut early = Vec::new();
    let mut late = Vec::new();
    let mut before_ack = 0;
    let mut count = 0;
    // Per commit (index seq - warm - 1): its first and last delivery, and how many.
    let mut span = vec![(u64::MAX, 0u64, 0u32); commits.saturating_sub(u64::from(warm)) as usize];
    for r in received {
        for &(seq, at) in &r.events {
            count += 1;
            if seq <= warm {
                continue;
            }
            let sent = timeline.sent(seq);
            let acked = timeline.acked(seq);
            if sent == 0 || acked == 0 {
                continue;
            }
            if let Some((first, last, n)) = span.get_mut((seq - warm - 1) as usize) {
                *first = (*first).min(at);
                *last = (*last).max(at);
                *n += 1;
            }
            from_send.push(at.saturating_sub(sent));
            if at < acked {
                before_ack += 1;
            }
            let lat = at.saturating_sub(acked);
            from_ack.push(lat);
            if seq <= warm + fifth {
                early.push(lat);
            } else if u64::from(seq) > commits.saturating_sub(u64::from(fifth)) {
                late.push(lat);
            }
        }
    }
    let mut first = Vec::with_capacity(span.len());
    let mut spread = Vec::with_capacity(span.len());
    for (i, &(at, last, n)) in span.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let seq = warm + 1 + i as u32;
        first.push(at.saturating_sub(timeline.acked(seq)));
        if n > 1 {
            spread.push(last - at);
        }
    }
    Outcome {
        commits,
        achieved,
        expected,
        received: count,
        from_send: Summary::of_ns(from_send),
        from_ack: Summary::of_ns(from_ack),
        before_ack,
        server_cpu,
        client_cpu,
        early_p50: Summary::of_ns(early).p50,
        late_p50: Summary::of_ns(late).p50,
        stats_messages: received.iter().map(|r| r.stats.len() as u64).sum(),
        end_mode: String::new(),
        closed: received.iter().filter(|r| r.closed).count(),
        first: Summary::of_ns(first),
        spread: Summary::of_ns(spread),
        queued_mean: f64::NAN,
        read_mean: f64::NAN,
    }
}

/// A LISTEN connection that timestamps every `bench_floor` notification; returns the
/// client (keep it until the task is stopped) and the task.
async fn floor_listener(
    url: &str,
    base: Instant,
    counter: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<Received>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .ctx("connecting the floor listener")?;
    // tokio-postgres hands notifications only to whoever polls the connection.
    let task = tokio::spawn(async move {
        let mut out = Received::default();
        loop {
            tokio::select! {
                msg = poll_fn(|cx| connection.poll_message(cx)) => match msg {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let at = ns_since(base);
                        if let Some(seq) = parse_seq(n.payload()) {
                            out.events.push((seq, at));
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = stop.changed() => break,
            }
        }
        out
    });
    client
        .batch_execute("LISTEN bench_floor")
        .await
        .ctx("LISTEN bench_floor")?;
    Ok((client, task))
}

/// The daemon's clock from a notification's arrival to its events queued.
const QUEUED_CLOCK: &str = "citapulse_wakeup_to_queued_seconds";
/// The daemon's clock of the move-and-read statement's round trip.
const READ_CLOCK: &str = "citapulse_log_read_seconds";

/// One of citapulse's clocks so far: its sum (s) and count; NaN for the others.
async fn daemon_clock(server: &Server, target: Target, name: &str) -> (f64, f64) {
    if !target.is_citapulse() {
        return (f64::NAN, f64::NAN);
    }
    let sum = server.metric(&format!("{name}_sum")).await;
    let count = server.metric(&format!("{name}_count")).await;
    (sum.unwrap_or(f64::NAN), count.unwrap_or(f64::NAN))
}

/// The mean of a clock between two readings of [`daemon_clock`], ms.
fn mean_ms_between(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) / (after.1 - before.1) * 1000.0
}

/// Writers for a target rate: 2 up to 1 000 commits/s (issue 10), 16 above (commits
/// that NOTIFY serialise on their WAL flush, so few writers cannot reach 5 000/s).
fn writers_for(rate: f64) -> usize {
    if rate <= 1000.0 { 2 } else { 16 }
}

/// Scenarios 1–3: citapulse (default configuration), the floor and Node.js, at each
/// rate and subscriber count, in interleaved rounds; medians over rounds.
pub async fn scenario(b: &Bench) -> Result<Section> {
    let mut section = Section::new("latency");
    let rates: &[f64] = if !b.rates.is_empty() {
        &b.rates
    } else if b.quick {
        &[200.0]
    } else {
        &[200.0, 1000.0, 5000.0]
    };
    let subs: &[usize] = if !b.subscribers.is_empty() {
        &b.subscribers
    } else if b.quick {
        &[1, 5]
    } else {
        &[1, 100]
    };
    let background = if b.quick { 3 } else { BACKGROUND_TENANTS };

    let admin = b.db.connect().await?;
    let node = b.node("bench_bare", &mut section).await;
    let logs = b.out_dir.join("logs");
    let relay = Server::relay(&b.db.url, RelayMode::Bare, &logs).await?;
    let keyed = RelayMode::Keyed(Target::RelayKeyed.table());
    let relay_keyed = Server::relay(&b.db.url, keyed, &logs).await?;
    let relay_direct = Server::relay(&b.db.url, RelayMode::Direct, &logs).await?;
    let relay_coalesce = match b.relay_coalesce {
        Some(hold) => Some(Server::relay(&b.db.url, RelayMode::Hold(hold), &logs).await?),
        None => None,
    };
    // Idle subscribers on other tenants, so the hubs hold 1 000 tenants with subscribers.
    let idle_on = |server: &Server| {
        client::connect_many(server.addr, &b.tokens, background, 1000, 64, 4096, |i| {
            format!("bg_{i}")
        })
    };
    let _node_idle = match &node {
        Some(server) => Some(idle_on(server).await?),
        None => None,
    };
    // The daemon currently running (its mode, the process, its idle subscribers).
    let mut current: Option<(Target, Server, Vec<client::Ws>)> = None;
    let mut switches = 0.0;

    let mut results: BTreeMap<(u64, usize, Target), Vec<Outcome>> = BTreeMap::new();
    for round in 0..b.rounds {
        for &rate in rates {
            let floor = Spec {
                target: Target::Floor,
                rate,
                writers: writers_for(rate),
                subscribers: 1,
                duration: b.duration,
            };
            let out = run(b, floor, None, &format!("floor_{round}_{rate}")).await?;
            results
                .entry((rate as u64, 0, Target::Floor))
                .or_default()
                .push(out);
            // The pinned-notify variant shows what the default costs at rates where it polls.
            let mut targets = vec![Target::Citapulse];
            if !b.quick && rate <= 1000.0 {
                targets.push(Target::CitapulseNotify);
            }
            targets.extend([
                Target::Node,
                Target::Relay,
                Target::RelayKeyed,
                Target::RelayDirect,
                Target::RelayCoalesce,
            ]);
            for target in targets {
                if target.is_citapulse() && current.as_ref().map(|c| c.0) != Some(target) {
                    if let Some((_, daemon, clients)) = current.take() {
                        switches += daemon
                            .metric("citapulse_wakeup_switches_total")
                            .await
                            .unwrap_or(0.0);
                        drop(clients);
                        daemon.stop().await;
                    }
                    let mode = if target == Target::Citapulse {
                        "adaptive"
                    } else {
                        "notify"
                    };
                    let daemon = b.daemon(mode, &[]).await?;
                    let clients = idle_on(&daemon).await?;
                    current = Some((target, daemon, clients));
                }
                let server = match target {
                    Target::Node => node.as_ref(),
                    Target::Relay => Some(&relay),
                    Target::RelayKeyed => Some(&relay_keyed),
                    Target::RelayDirect => Some(&relay_direct),
                    Target::RelayCoalesce => relay_coalesce.as_ref(),
                    _ => current.as_ref().map(|c| &c.1),
                };
                let Some(server) = server else { continue };
                for &n in subs {
                    if target.is_citapulse() {
                        b.db.reset_wakeup(&admin).await?;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let spec = Spec {
                        target,
                        rate,
                        writers: writers_for(rate),
                        subscribers: n,
                        duration: b.duration,
                    };
                    let tenant = format!("lat_{}_{round}_{rate}_{n}", target.key());
                    let queued = daemon_clock(server, target, QUEUED_CLOCK).await;
                    let read = daemon_clock(server, target, READ_CLOCK).await;
                    let mut out = run(b, spec, Some(server), &tenant).await?;
                    if target.is_citapulse() {
                        out.end_mode = server.wakeup_mode().await;
                        let queued_after = daemon_clock(server, target, QUEUED_CLOCK).await;
                        out.queued_mean = mean_ms_between(queued, queued_after);
                        let read_after = daemon_clock(server, target, READ_CLOCK).await;
                        out.read_mean = mean_ms_between(read, read_after);
                    }
                    eprintln!(
                        "  latency round {round} {} {rate}/s × {n}: ack p50 {} ms p99 {} ms, {}/{} delivered, {} closed",
                        target.key(),
                        num(out.from_ack.p50),
                        num(out.from_ack.p99),
                        out.received,
                        out.expected,
                        out.closed
                    );
                    results
                        .entry((rate as u64, n, target))
                        .or_default()
                        .push(out);
                }
            }
        }
    }
    if let Some((_, daemon, clients)) = current.take() {
        switches += daemon
            .metric("citapulse_wakeup_switches_total")
            .await
            .unwrap_or(0.0);
        drop(clients);
        daemon.stop().await;
    }
    if let Some(node) = node {
        node.stop().await;
    }
    relay.stop().await;
    relay_keyed.stop().await;
    relay_direct.stop().await;
    if let Some(relay) = relay_coalesce {
        relay.stop().await;
    }

    let medians: BTreeMap<(u64, usize, Target), Outcome> = results
        .iter()
        .map(|(k, runs)| (*k, Outcome::median_of(runs)))
        .collect();
    let mut main = Table::new(
        format!(
            "Commit→client latency, ms (median of {} rounds × {:.0} s; citapulse in its default configuration, wakeup.mode = adaptive)",
            b.rounds,
            b.duration.as_secs_f64()
        ),
        &[
            "commits/s (achieved)",
            "subs",
            "contestant",
            "ack p50",
            "ack p99",
            "ack p99.9",
            "ack max",
            "send p50",
            "send p99",
            "delivered",
            "server CPU s /100k",
            "late/early p50",
            "triggers at end",
        ],
    );
    let mut ratios = Table::new(
        "Ratios in the same run (ack clock; < 1 means the contestant is lower)",
        &[
            "commits/s",
            "subs",
            "contestant",
            "p50 vs floor",
            "p99 vs floor",
            "p50 vs Node",
            "p99 vs Node",
            "CPU/100k vs Node",
            "p50 vs bare relay",
            "p99 vs bare relay",
            "CPU/100k vs bare relay",
        ],
    );
    let mut split = Table::new(
        "Where a fan-out's time goes (ack clock, ms): per commit, its first delivery to any subscriber, and the spread from its first delivery to its last",
        &[
            "commits/s",
            "subs",
            "contestant",
            "ack p50",
            "first p50",
            "first p99",
            "spread p50",
            "spread p99",
            "citapulse: notification → queued for all, mean",
            "citapulse: its read's round trip, mean",
        ],
    );
    let mut json_runs = Vec::new();
    for (&(rate, n, target), out) in &medians {
        if target != Target::Floor {
            split.row(vec![
                rate.to_string(),
                n.to_string(),
                target.name().into(),
                num(out.from_ack.p50),
                num(out.first.p50),
                num(out.first.p99),
                // One subscriber: no spread.
                if n > 1 {
                    num(out.spread.p50)
                } else {
                    "–".into()
                },
                if n > 1 {
                    num(out.spread.p99)
                } else {
                    "–".into()
                },
                num(out.queued_mean),
                num(out.read_mean),
            ]);
        }
        main.row(vec![
            format!("{rate} ({})", num(out.achieved)),
            if target == Target::Floor {
                "–".into()
            } else {
                n.to_string()
            },
            target.name().into(),
            num(out.from_ack.p50),
            num(out.from_ack.p99),
            num(out.from_ack.p999),
            num(out.from_ack.max),
            num(out.from_send.p50),
            num(out.from_send.p99),
            if out.closed > 0 {
                format!("{}/{} ({} closed)", out.received, out.expected, out.closed)
            } else {
                format!("{}/{}", out.received, out.expected)
            },
            num(out.cpu_per_100k()),
            ratio(out.late_p50, out.early_p50),
            if target.is_citapulse() {
                out.end_mode.clone()
            } else {
                "–".into()
            },
        ]);
        json_runs.push(json!({
            "rate": rate, "subscribers": n, "contestant": target.key(),
            "rounds": results.get(&(rate, n, target)).map_or(0, Vec::len),
            "median": out.json(),
            "runs": results.get(&(rate, n, target)).map(|rs| rs.iter().map(Outcome::json).collect::<Vec<_>>()),
        }));
        if !target.is_citapulse()
            && !matches!(
                target,
                Target::RelayKeyed | Target::RelayDirect | Target::RelayCoalesce
            )
        {
            continue;
        }
        let floor = medians.get(&(rate, 0, Target::Floor));
        let node = medians.get(&(rate, n, Target::Node));
        let relay = medians.get(&(rate, n, Target::Relay));
        ratios.row(vec![
            rate.to_string(),
            n.to_string(),
            target.key().into(),
            floor.map_or("–".into(), |f| ratio(out.from_ack.p50, f.from_ack.p50)),
            floor.map_or("–".into(), |f| ratio(out.from_ack.p99, f.from_ack.p99)),
            node.map_or("–".into(), |x| ratio(out.from_ack.p50, x.from_ack.p50)),
            node.map_or("–".into(), |x| ratio(out.from_ack.p99, x.from_ack.p99)),
            node.map_or("–".into(), |x| {
                ratio(out.cpu_per_100k(), x.cpu_per_100k())
            }),
            relay.map_or("–".into(), |x| ratio(out.from_ack.p50, x.from_ack.p50)),
            relay.map_or("–".into(), |x| ratio(out.from_ack.p99, x.from_ack.p99)),
            relay.map_or("–".into(), |x| {
                ratio(out.cpu_per_100k(), x.cpu_per_100k())
            }),
        ]);
    }
    section.tables.push(main);
    section.tables.push(ratios);
    section.tables.push(split);
    section.notes.push(format!(
        "wake-up mode switches made by the daemons during the scenario: {switches} (the wakeup row is reset to notify before every citapulse run)"
    ));
    section.notes.push(
        "ack = from COMMIT acknowledged to the writer; send = from just before COMMIT was sent (includes the WAL flush). \
         A delivery that beat the acknowledgement counts as 0 ms on the ack clock."
            .into(),
    );
    section.json =
        json!({ "runs": json_runs, "background_tenants": background, "wakeup_switches": switches });
    Ok(section)
}

/// Issue 9: latency in each wake-up mode at 200 commits/s (1 writer), 1 000 commits/s
/// (2 writers) and full speed (16 writers), one subscriber.
pub async fn modes(b: &Bench) -> Result<Section> {
    let mut section = Section::new("wakeup_modes");
    let loads: &[(f64, usize)] = if b.quick {
        &[(200.0, 1)]
    } else {
        &[(200.0, 1), (1000.0, 2), (0.0, 16)]
    };
    let modes: &[&str] = if b.quick {
        &["notify", "poll"]
    } else {
        &["notify", "poll", "adaptive"]
    };
    // (mode, rate, writers) -> per round: outcome, triggers' mode at the end, switches.
    type ModeRuns = Vec<(Outcome, String, f64)>;
    let mut results: BTreeMap<(&str, u64, usize), ModeRuns> = BTreeMap::new();
    for round in 0..b.rounds {
        for &mode in modes {
            for &(rate, writers) in loads {
                // A fresh daemon per run: every run starts notifying with no history.
                let daemon = b.daemon(mode, &[]).await?;
                let spec = Spec {
                    target: Target::Citapulse,
                    rate,
                    writers,
                    subscribers: 1,
                    duration: b.duration,
                };
                let tenant = format!("mode_{mode}_{round}_{rate}_{writers}");
                let out = run(b, spec, Some(&daemon), &tenant).await?;
                let now = daemon.wakeup_mode().await;
                let switches = daemon
                    .metric("citapulse_wakeup_switches_total")
                    .await
                    .unwrap_or(f64::NAN);
                daemon.stop().await;
                eprintln!(
                    "  mode {mode} round {round} {rate}/s × {writers} writers: {} commits/s, ack p50 {} ms p99 {} ms",
                    num(out.achieved),
                    num(out.from_ack.p50),
                    num(out.from_ack.p99)
                );
                results
                    .entry((mode, rate as u64, writers))
                    .or_default()
                    .push((out, now, switches));
            }
        }
    }
    let mut table = Table::new(
        format!(
            "Latency per wake-up mode, 1 subscriber, ms (median of {} rounds × {:.0} s, a fresh daemon per run)",
            b.rounds,
            b.duration.as_secs_f64()
        ),
        &[
            "mode",
            "target commits/s",
            "writers",
            "achieved commits/s",
            "ack p50",
            "ack p99",
            "ack p99.9",
            "send p50",
            "send p99",
            "delivered",
            "triggers at end",
            "switches",
        ],
    );
    let mut json_runs = Vec::new();
    for (&(mode, rate, writers), runs) in &results {
        let outs: Vec<Outcome> = runs.iter().map(|r| r.0.clone()).collect();
        let m = Outcome::median_of(&outs);
        let end_modes: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
        let switches = median(runs.iter().map(|r| r.2));
        table.row(vec![
            mode.into(),
            if rate == 0 {
                "max".into()
            } else {
                rate.to_string()
            },
            writers.to_string(),
            num(m.achieved),
            num(m.from_ack.p50),
            num(m.from_ack.p99),
            num(m.from_ack.p999),
            num(m.from_send.p50),
            num(m.from_send.p99),
            format!("{}/{}", m.received, m.expected),
            end_modes.join(","),
            num(switches),
        ]);
        json_runs.push(json!({
            "mode": mode, "rate": rate, "writers": writers, "median": m.json(),
            "triggers_at_end": end_modes, "switches": switches,
        }));
    }
    // Issue 9's goals, from the medians.
    let get = |mode: &str, rate: u64, writers: usize| {
        results
            .get(&(mode, rate, writers))
            .map(|runs| Outcome::median_of(&runs.iter().map(|r| r.0.clone()).collect::<Vec<_>>()))
    };
    for &(rate, writers) in loads.iter().filter(|(r, _)| *r > 0.0) {
        if let (Some(a), Some(n)) = (
            get("adaptive", rate as u64, writers),
            get("notify", rate as u64, writers),
        ) {
            section.notes.push(format!(
                "adaptive vs notify at {rate} commits/s ({writers} writers): p50 {} vs {} ms ({}), p99 {} vs {} ms ({}); goal: within 10 %",
                num(a.from_ack.p50),
                num(n.from_ack.p50),
                ratio(a.from_ack.p50, n.from_ack.p50),
                num(a.from_ack.p99),
                num(n.from_ack.p99),
                ratio(a.from_ack.p99, n.from_ack.p99)
            ));
        }
    }
    section.tables.push(table);
    section.json = json!({ "runs": json_runs });
    Ok(section)
}
