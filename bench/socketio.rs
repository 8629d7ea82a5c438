//! The Socket.IO endpoint against `/ws`: the same clients in one Node process
//! (`bench/peers/socketio/clients.mjs`: socket.io-client over its WebSocket transport, or
//! the `ws` package on `/ws`), subscribed to one tenant, while the bench commits single
//! rows at a fixed rate. Measures commit→client latency at the clients and the daemon's
//! CPU per delivery, alternating the two transports in rounds so drift hits both.
//!
//! The floor, in the same rounds: the bare relays of [`crate::relay`] (a NOTIFY trigger on
//! `citas_relay`, LISTEN, socketioxide's room broadcast or a plain tungstenite relay),
//! with the same clients: what each transport costs without anything of the daemon.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::Bench;
use crate::error::{Context, Result, failed};
use crate::report::{Section, Table, num};

const TENANT: &str = "sio";

/// The floor's source: each committed row NOTIFYs the relay with the fields the clients
/// read, in the daemon's message shape.
const RELAY_SQL: &str = "
    CREATE TABLE IF NOT EXISTS citas_relay (
        id bigserial PRIMARY KEY, negocio_id text NOT NULL, cliente_id text, estado text);
    CREATE OR REPLACE FUNCTION citas_relay_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bench_relay', json_build_object('type', 'cita_created',
            'data', json_build_object('row', json_build_object('cliente_id', NEW.cliente_id)))::text);
        RETURN NULL;
    END $$;
    CREATE OR REPLACE TRIGGER citas_relay_notify AFTER INSERT ON citas_relay
        FOR EACH ROW EXECUTE FUNCTION citas_relay_notify();
";

/// Installs the clients' packages once (pinned lock file).
fn prepare(dir: &Path) -> std::result::Result<(), String> {
    if dir.join("node_modules/socket.io-client").is_dir() && dir.join("node_modules/ws").is_dir() {
        return Ok(());
    }
    eprintln!("citapulse-bench: installing socket.io-client and ws (npm ci)");
    match std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`npm ci` in {} failed ({s})", dir.display())),
        Err(e) => Err(format!("cannot run npm: {e}")),
    }
}

/// How many clients, and how many commits per second for how long.
#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    rate: u32,
    secs: u64,
}

/// One round of one transport: clients up, `rate` commits/s for `secs`, then their figures.
async fn round(
    bench: &Bench,
    server: &crate::env::Server,
    table: &str,
    dir: &Path,
    transport: &str,
    load: Load,
) -> Result<Value> {
    let Load {
        clients,
        rate,
        secs,
    } = load;
    let opts = json!({
        "base": format!("http://{}", server.addr),
        "token": bench.tokens.tenant(TENANT)?,
        "transport": transport,
        "clients": clients,
        "channel": format!("estadisticas:{TENANT}"),
    });
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("clients.mjs"))
        .arg(opts.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .ctx("starting the Node clients")?;
    let mut stdin = child.stdin.take().ok_or_else(|| failed("no stdin"))?;
    let mut lines = BufReader::new(child.stdout.take().ok_or_else(|| failed("no stdout"))?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .map_err(|_| failed(format!("{clients} {transport} clients not ready in 120 s")))?
        .ctx("reading the clients")?;
    if ready.as_deref() != Some("READY") {
        return Err(failed(format!("the clients said {ready:?}")));
    }
    let db = bench.db.connect().await?;
    let insert = db
        .prepare(&format!(
            "INSERT INTO {table} (negocio_id, cliente_id, estado) VALUES ($1, \
                 (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text, 'pendiente')"
        ))
        .await
        .ctx("preparing the writer")?;
    let cpu_before = server.cpu_seconds();
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut next = tokio::time::Instant::now();
    let mut written = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        db.execute(&insert, &[&TENANT]).await.ctx("writing")?;
        written += 1;
        next += every;
        tokio::time::sleep_until(next).await;
    }
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = server.cpu_seconds() - cpu_before;
    stdin
        .write_all(b"STOP\n")
        .await
        .ctx("stopping the clients")?;
    let summary = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| failed("no summary from the clients"))?
        .ctx("reading the summary")?
        .ok_or_else(|| failed("the clients closed without a summary"))?;
    let _ = child.wait().await;
    let mut v: Value = serde_json::from_str(&summary)
        .map_err(|e| failed(format!("the clients' summary {summary:?}: {e}")))?;
    let received = v["received"].as_f64().unwrap_or(0.0);
    v["transport"] = json!(transport);
    v["written"] = json!(written);
    v["expected"] = json!(written * clients as u64);
    v["daemon_cpu_s"] = json!(cpu);
    v["cpu_us_per_delivery"] = json!(if received > 0.0 {
        cpu * 1e6 / received
    } else {
        f64::NAN
    });
    Ok(v)
}

pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("socketio");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio");
    if let Err(why) = prepare(&dir) {
        section.notes.push(format!("skipped: {why}"));
        return Ok(section);
    }
    // The goal's load (1 000 clients, 100 commits/s: 100 000 deliveries/s into one Node
    // process), and a fifth of it, where the clients keep up and the server's part shows.
    let (clients, rates, secs, rounds) = if bench.quick {
        (20, vec![20], 2, 1)
    } else {
        (1_000, vec![100, 20], 10, 2)
    };
    crate::env::raise_nofile();
    let server = bench
        .daemon(
            "notify",
            &[("CITAPULSE_LIMITS__QUEUE_LEN", "100000".to_string())],
        )
        .await?;
    let db = bench.db.connect().await?;
    db.batch_execute(RELAY_SQL)
        .await
        .ctx("creating the relay's table")?;
    let relay = crate::env::Server::relay(
        &bench.db.url,
        crate::env::RelayMode::Bare,
        &bench.out_dir.join("logs"),
    )
    .await?;
    let mut runs = Vec::new();
    for &rate in &rates {
        for _ in 0..rounds {
            for (name, target, table) in [
                ("citapulse", &server, "citas"),
                ("relay", &relay, "citas_relay"),
            ] {
                for transport in ["ws", "socketio"] {
                    let mut run = round(
                        bench,
                        target,
                        table,
                        &dir,
                        transport,
                        Load {
                            clients,
                            rate,
                            secs,
                        },
                    )
                    .await?;
                    run["rate"] = json!(rate);
                    run["server"] = json!(name);
                    runs.push(run);
                }
            }
        }
    }
    server.stop().await;
    relay.stop().await;
    let mut table = Table::new(
        format!(
            "{clients} clients of one tenant, single-row commits for {secs} s, one Node process of clients (µs from the INSERT's clock_timestamp)"
        ),
        &[
            "commits/s",
            "server",
            "transport",
            "received / expected",
            "p50 µs",
            "p99 µs",
            "server CPU µs per delivery",
            "client CPU s",
        ],
    );
    for r in &runs {
        table.row(vec![
            r["rate"].to_string(),
            r["server"].as_str().unwrap_or("?").to_string(),
            r["transport"].as_str().unwrap_or("?").to_string(),
            format!("{} / {}", r["received"], r["expected"]),
            r["p50_us"].to_string(),
            r["p99_us"].to_string(),
            num(r["cpu_us_per_delivery"].as_f64().unwrap_or(f64::NAN)),
            num(r["client_cpu_s"].as_f64().unwrap_or(f64::NAN)),
        ]);
    }
    section.tables.push(table);
    section.json = json!({"runs": runs, "clients": clients, "rates": rates, "secs": secs});
    Ok(section)
}
