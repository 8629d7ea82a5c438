//! Issue 20: people. (1) Presence of N users over two instances: each user subscribes to
//! `estadisticas:hot` on one instance (alternately), and a watcher on the *other*
//! instance times when the user appears in a `presence_join` (from the user's
//! `subscribed`) and in a `presence_leave` (from its close plus the leave grace).
//! (2) Fan-out cost of a routed event against a tenant-only one: the same inserts with
//! and without `route_columns`, S tenant subscribers plus the two routed users, server
//! CPU per event and delivery latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::Bench;
use crate::client::{self, Ws, ns_since, parse_seq, source_of};
use crate::error::{Context, Result, failed};
use crate::report::{Section, Summary, Table, num, ratio, round};

/// The leave grace the bench runs with (subtracted from leave times).
const GRACE_MS: u64 = 1_000;
/// How long all joins (or leaves) may take to show up.
const SEEN_TIMEOUT: Duration = Duration::from_secs(60);

/// When the watcher saw each user join and leave, and how many presence messages.
#[derive(Default)]
struct Seen {
    joined: HashMap<String, u64>,
    left: HashMap<String, u64>,
    messages: usize,
}

/// Reads a watcher's socket, timestamping each user of each presence message.
async fn watch_presence(
    mut ws: Ws,
    base: Instant,
    seen: Arc<Mutex<Seen>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let at = ns_since(base);
                    if !text.contains("\"presence_") {
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    let join = v["type"] == "presence_join";
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    s.messages += 1;
                    for u in v["data"]["users"].as_array().into_iter().flatten() {
                        if let Some(id) = u["user_id"].as_str() {
                            let map = if join { &mut s.joined } else { &mut s.left };
                            map.entry(id.to_string()).or_insert(at);
                        }
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
}

/// Connects as `sub` of `tenant` and subscribes to its channel; returns the socket and when
/// `subscribed` arrived.
async fn join(
    bench: &Bench,
    addr: SocketAddr,
    i: usize,
    sub: &str,
    tenant: &str,
    base: Instant,
) -> Result<(Ws, u64)> {
    let token = bench.tokens.user(sub, tenant, "staff")?;
    let mut ws = client::connect(addr, source_of(i), &token, 4096).await?;
    client::subscribe(&mut ws, tenant).await?;
    Ok((ws, ns_since(base)))
}

/// Waits until watcher `k` has seen every name in `names` (joins, or leaves).
async fn wait_seen(seen: &Mutex<Seen>, names: &[String], leaves: bool) -> bool {
    let deadline = Instant::now() + SEEN_TIMEOUT;
    while Instant::now() < deadline {
        let done = {
            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
            let map = if leaves { &s.left } else { &s.joined };
            names.iter().all(|n| map.contains_key(n))
        };
        if done {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Connects `users` users in tenants `t0..t{tenants}` (user i in tenant i % tenants, on
/// instance (i / tenants) % 2, so each tenant has users on both), all at once; with
/// presence on, a watcher per tenant and instance times each user on the *other*
/// instance, join and leave. With presence off, the same storm: the floor of its cost.
async fn presence_run(bench: &Bench, users: usize, tenants: usize, enabled: bool) -> Result<Value> {
    let extra = [
        ("CITAPULSE_PRESENCE__LEAVE_GRACE_MS", GRACE_MS.to_string()),
        ("CITAPULSE_PRESENCE__ENABLED", enabled.to_string()),
    ];
    let a = bench.daemon("notify", &extra).await?;
    let b = bench.daemon("notify", &extra).await?;
    let servers = [a.addr, b.addr];
    let base = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let tenant_of = |i: usize| format!("t{}", i % tenants);
    let instance_of = |i: usize| (i / tenants) % 2;
    // seen[t * 2 + k]: the watcher of tenant t on instance k.
    let seen: Vec<Arc<Mutex<Seen>>> = (0..tenants * 2).map(|_| Arc::default()).collect();
    if enabled {
        for t in 0..tenants {
            for (k, addr) in servers.iter().enumerate() {
                let (ws, _) = join(
                    bench,
                    *addr,
                    10_000_000 + t * 2 + k,
                    &format!("watcher-{k}"),
                    &format!("t{t}"),
                    base,
                )
                .await?;
                tokio::spawn(watch_presence(
                    ws,
                    base,
                    seen[t * 2 + k].clone(),
                    stop_rx.clone(),
                ));
            }
        }
        // The watchers see each other: wait for that, then forget it.
        let watchers = ["watcher-0".to_string(), "watcher-1".to_string()];
        for s in &seen {
            if !wait_seen(s, &watchers, false).await {
                return Err(failed("the watchers never saw each other join"));
            }
        }
        for s in &seen {
            *s.lock().unwrap_or_else(|p| p.into_inner()) = Seen::default();
        }
    }
    let cpu0 = a.cpu_seconds() + b.cpu_seconds();
    let t0 = Instant::now();
    let joined: Vec<Result<(Ws, u64)>> = futures_util::stream::iter(0..users)
        .map(|i| {
            let addr = servers[instance_of(i)];
            let tenant = tenant_of(i);
            async move { join(bench, addr, i, &format!("u{i}"), &tenant, base).await }
        })
        .buffered(200)
        .collect()
        .await;
    let mut sockets = Vec::with_capacity(users);
    let mut subscribed_at = Vec::with_capacity(users);
    for r in joined {
        let (ws, at) = r?;
        sockets.push(ws);
        subscribed_at.push(at);
    }
    let storm_secs = t0.elapsed().as_secs_f64();
    // The watcher that times user i, and what each watcher must see.
    let watcher_of = |i: usize| (i % tenants) * 2 + (1 - instance_of(i));
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); tenants * 2];
    for i in 0..users {
        expected[watcher_of(i)].push(format!("u{i}"));
    }
    let wait_all = |leaves: bool| {
        let seen = &seen;
        let expected = &expected;
        async move {
            for (w, names) in expected.iter().enumerate() {
                if !wait_seen(&seen[w], names, leaves).await {
                    return false;
                }
            }
            true
        }
    };
    let all_joined = !enabled || wait_all(false).await;
    let join_cpu = a.cpu_seconds() + b.cpu_seconds() - cpu0;
    let latency = |leaves: bool, start: &dyn Fn(usize) -> u64| -> (Summary, usize) {
        let mut samples = Vec::with_capacity(users);
        let mut missing = 0;
        for i in 0..users {
            let s = seen[watcher_of(i)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let map = if leaves { &s.left } else { &s.joined };
            match map.get(&format!("u{i}")) {
                Some(at) => samples.push(at.saturating_sub(start(i))),
                None => missing += 1,
            }
        }
        (Summary::of_ns(samples), missing)
    };
    let messages = || -> usize {
        seen.iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).messages)
            .sum()
    };
    let (joins, joins_missing) = latency(false, &|i| subscribed_at[i]);
    let join_messages = messages();

    // Everyone leaves at once.
    let cpu1 = a.cpu_seconds() + b.cpu_seconds();
    let mut closed_at = Vec::with_capacity(users);
    for mut ws in sockets {
        let _ = ws.close(None).await;
        closed_at.push(ns_since(base));
    }
    let all_left = !enabled || wait_all(true).await;
    if !enabled {
        // As long as a leave takes with presence on, so CPU is compared over the same work.
        tokio::time::sleep(Duration::from_millis(GRACE_MS + 500)).await;
    }
    let leave_cpu = a.cpu_seconds() + b.cpu_seconds() - cpu1;
    let grace_ns = GRACE_MS * 1_000_000;
    let (leaves, leaves_missing) = latency(true, &|i| closed_at[i] + grace_ns);
    let all_messages = messages();
    let _ = stop_tx.send(true);
    a.stop().await;
    b.stop().await;
    Ok(json!({
        "users": users, "tenants": tenants, "presence": enabled,
        "connect_storm_seconds": round(storm_secs, 2),
        "join": joins.json(), "join_missing": if enabled { joins_missing } else { 0 },
        "join_server_cpu_s": round(join_cpu, 3),
        "leave": leaves.json(), "leave_missing": if enabled { leaves_missing } else { 0 },
        "leave_server_cpu_s": round(leave_cpu, 3),
        "presence_messages_per_watcher": all_messages as f64 / (tenants * 2) as f64,
        "join_messages_per_watcher": join_messages as f64 / (tenants * 2) as f64,
        "complete": all_joined && all_left,
    }))
}

/// Presence of N users over two instances: one tenant (every user sees every other's
/// join: the worst case), many tenants, and the storm without presence (the floor).
async fn presence(bench: &Bench, section: &mut Section) -> Result<Value> {
    let users = if bench.quick { 200 } else { 10_000 };
    let spread = if bench.quick { 4 } else { 100 };
    let mut table = Table::new(
        format!(
            "Presence of {users} users over 2 instances: change seen on the other instance (join from `subscribed`, leave from close + {GRACE_MS} ms grace)"
        ),
        &[
            "tenants",
            "presence",
            "connect storm s",
            "join p50 ms",
            "join p99 ms",
            "leave p50 ms",
            "leave p99 ms",
            "missing",
            "server CPU s (join + leave)",
            "presence msgs per watcher",
        ],
    );
    let mut runs = Vec::new();
    for (tenants, enabled) in [(1, true), (spread, true), (spread, false)] {
        let r = presence_run(bench, users, tenants, enabled).await?;
        let ms = |v: &Value, k: &str| v[k].as_f64().map_or("-".into(), num);
        table.row(vec![
            tenants.to_string(),
            if enabled {
                "on".into()
            } else {
                "off (floor)".into()
            },
            num(r["connect_storm_seconds"].as_f64().unwrap_or(f64::NAN)),
            if enabled {
                ms(&r["join"], "p50_ms")
            } else {
                "-".into()
            },
            if enabled {
                ms(&r["join"], "p99_ms")
            } else {
                "-".into()
            },
            if enabled {
                ms(&r["leave"], "p50_ms")
            } else {
                "-".into()
            },
            if enabled {
                ms(&r["leave"], "p99_ms")
            } else {
                "-".into()
            },
            format!(
                "{}",
                r["join_missing"].as_u64().unwrap_or(0) + r["leave_missing"].as_u64().unwrap_or(0)
            ),
            format!(
                "{} + {}",
                num(r["join_server_cpu_s"].as_f64().unwrap_or(f64::NAN)),
                num(r["leave_server_cpu_s"].as_f64().unwrap_or(f64::NAN))
            ),
            if enabled {
                num(r["presence_messages_per_watcher"]
                    .as_f64()
                    .unwrap_or(f64::NAN))
            } else {
                "-".into()
            },
        ]);
        if enabled && r["complete"] != true {
            section.notes.push(format!(
                "{tenants} tenant(s): not every presence change was seen within {SEEN_TIMEOUT:?}"
            ));
        }
        runs.push(r);
    }
    section.tables.push(table);
    Ok(Value::Array(runs))
}

/// One phase of the routed fan-out: `events` inserts, paced; per event the latency
/// until every tenant subscriber had it, and the server CPU per event.
async fn fanout_phase(
    server: &crate::env::Server,
    db: &tokio_postgres::Client,
    tenant_subs: &mut [Ws],
    events: usize,
    first_seq: usize,
) -> Result<(Summary, f64)> {
    let base = Instant::now();
    let cpu0 = server.cpu_seconds();
    let mut samples = Vec::with_capacity(events);
    for e in 0..events {
        let seq = first_seq + e;
        let sent = ns_since(base);
        db.execute(
            &format!(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
                 VALUES ('hot', '{seq}', 'p1', current_date, '10:00', '10:30', 'confirmada')"
            ),
            &[],
        )
        .await
        .ctx("fan-out insert")?;
        let mut last = 0;
        for ws in tenant_subs.iter_mut() {
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .map_err(|_| failed("a tenant subscriber missed an event"))?;
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        if parse_seq(&text) == Some(seq as u32) {
                            last = last.max(ns_since(base));
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return Err(failed("a tenant subscriber's socket ended")),
                }
            }
        }
        samples.push(last.saturating_sub(sent));
    }
    let cpu = server.cpu_seconds() - cpu0;
    Ok((Summary::of_ns(samples), cpu / events as f64))
}

/// Routed against tenant-only events, same subscribers.
async fn routed_fanout(bench: &Bench, section: &mut Section) -> Result<Value> {
    let subs = if bench.quick { 50 } else { 1_000 };
    let events = if bench.quick { 20 } else { 300 };
    let server = bench.daemon("notify", &[]).await?;
    let db = bench.db.connect().await?;
    let token = bench.tokens.tenant("hot")?;
    let mut tenant_subs = Vec::with_capacity(subs);
    for i in 0..subs {
        let mut ws = client::connect(server.addr, source_of(i), &token, 65_536).await?;
        client::subscribe(&mut ws, "hot").await?;
        tenant_subs.push(ws);
    }
    // The professional every routed row reaches (the client id is new in each row).
    let mut people = Vec::new();
    for (i, who) in ["p1"].iter().enumerate() {
        let token = bench.tokens.user(who, "hot", "staff")?;
        let mut ws = client::connect(server.addr, source_of(subs + i), &token, 65_536).await?;
        client::expect_text(&mut ws, "connected").await?;
        ws.send(Message::Text(
            json!({"type": "subscribe", "data": {"channel": format!("usuario:hot:{who}")}})
                .to_string()
                .into(),
        ))
        .await
        .ctx("subscribing a person")?;
        client::expect_text(&mut ws, "subscribed").await?;
        people.push(ws);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    for mut ws in people {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = ws.next() => if !matches!(f, Some(Ok(_))) { break },
                    _ = stop.changed() => break,
                }
            }
        });
    }
    let set_routes = |cols: &'static str| {
        format!(
            "SELECT citapulse.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment', route_columns => '{cols}')"
        )
    };
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    // Alternate, twice each, so drift in the machine hits both.
    let mut results: HashMap<&str, Vec<(Summary, f64)>> = HashMap::new();
    let mut seq = 0;
    for round in 0..2 {
        for (label, cols) in [
            ("tenant-only", "{}"),
            ("routed (2 route values)", "{profesional_id,cliente_id}"),
        ] {
            db.batch_execute(&set_routes(cols))
                .await
                .ctx("setting route_columns")?;
            let r = fanout_phase(
                &server,
                &db,
                &mut tenant_subs,
                events,
                1_000_000 * (round + 1) + seq,
            )
            .await?;
            seq += events;
            results.entry(label).or_default().push(r);
        }
    }
    let _ = stop_tx.send(true);
    db.batch_execute(&set_routes("{profesional_id,cliente_id}"))
        .await
        .ctx("restoring route_columns")?;
    server.stop().await;
    let summarize = |label: &str| {
        let runs = &results[label];
        let lat = Summary::median_of(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let cpu = runs.iter().map(|r| r.1).sum::<f64>() / runs.len() as f64;
        (lat, cpu)
    };
    let (plain_lat, plain_cpu) = summarize("tenant-only");
    let (routed_lat, routed_cpu) = summarize("routed (2 route values)");
    let mut table = Table::new(
        format!(
            "Routed vs tenant-only events: {subs} tenant subscribers (+1 user channel), {events} events × 2 rounds"
        ),
        &[
            "event",
            "p50 ms to the last subscriber",
            "p99 ms",
            "server CPU ms per event",
            "vs tenant-only",
        ],
    );
    for (label, lat, cpu) in [
        ("tenant-only", plain_lat, plain_cpu),
        ("routed (2 route values)", routed_lat, routed_cpu),
    ] {
        rows.push(vec![
            label.to_string(),
            num(lat.p50),
            num(lat.p99),
            num(cpu * 1e3),
            ratio(cpu, plain_cpu),
        ]);
        out.insert(
            label.to_string(),
            json!({"latency": lat.json(), "cpu_ms_per_event": round(cpu * 1e3, 4)}),
        );
    }
    for r in rows {
        table.row(r);
    }
    section.tables.push(table);
    out.insert("cpu_ratio".into(), json!(round(routed_cpu / plain_cpu, 3)));
    Ok(Value::Object(out))
}

/// The scenario.
pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("people");
    let presence = presence(bench, &mut section).await?;
    let routed = routed_fanout(bench, &mut section).await?;
    section.json = json!({"presence": presence, "routed_fanout": routed});
    Ok(section)
}
