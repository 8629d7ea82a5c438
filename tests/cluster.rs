//! Several daemons on one database, behind a real nginx: the same events everywhere,
//! statistics computed once per change cluster-wide, instance loss and drain without a
//! lost event. Needs Debian's `nginx` (`.ci/run` installs it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_send_the_same_events_and_stats_cost_stays_flat() {
    let db = TestDb::new().await;
    let d1 = Daemon::start(&db.url, |_| {}).await;
    let mut c1 = WsClient::subscribed(d1.addr, "t1").await;
    c1.expect_type("stats").await;

    // One instance: K paced changes.
    const K: i64 = 12;
    let q_before = d1.metric("citapulse_stats_queries_total").await;
    for n in 1..=K {
        db.insert_cita("t1", "pendiente").await;
        c1.stats_until(|s| s["total_citas"] == n).await;
    }
    let single = d1.metric("citapulse_stats_queries_total").await - q_before;

    // Three instances, one client each: the same K changes again.
    let d2 = Daemon::start(&db.url, |_| {}).await;
    let d3 = Daemon::start(&db.url, |_| {}).await;
    let mut c2 = WsClient::subscribed(d2.addr, "t1").await;
    let mut c3 = WsClient::subscribed(d3.addr, "t1").await;
    for c in [&mut c2, &mut c3] {
        c.stats_until(|s| s["total_citas"] == K).await;
    }
    c1.backlog.clear();
    let daemons = [&d1, &d2, &d3];
    let mut before = 0.0;
    for d in daemons {
        before += d.metric("citapulse_stats_queries_total").await;
    }
    let mut last_stats = vec![Value::Null; 3];
    for n in K + 1..=2 * K {
        db.insert_cita("t1", "pendiente").await;
        for (i, c) in [&mut c1, &mut c2, &mut c3].into_iter().enumerate() {
            last_stats[i] = c.stats_until(|s| s["total_citas"] == n).await["data"].clone();
        }
    }
    let mut after = 0.0;
    let mut shared = 0.0;
    for d in daemons {
        after += d.metric("citapulse_stats_queries_total").await;
        shared += d.metric("citapulse_stats_shared_total").await;
    }
    let triple = after - before;
    eprintln!(
        "stats queries per change: 1 instance {:.2}, 3 instances {:.2} ({} results shared)",
        single / K as f64,
        triple / K as f64,
        shared
    );
    assert!(shared > 0.0, "the other instances reuse computed results");
    assert!(
        triple <= single * 1.5 + 2.0,
        "3 instances ran {triple} stats queries for {K} changes, 1 instance ran {single}"
    );

    // Same events, same ids, same order on every instance.
    let ids =
        |c: &WsClient| -> Vec<i64> { c.backlog.iter().filter_map(|m| m["id"].as_i64()).collect() };
    let (i1, i2, i3) = (ids(&c1), ids(&c2), ids(&c3));
    assert_eq!(i1.len() as i64, K);
    assert_eq!(i1, i2);
    assert_eq!(i1, i3);
    // The same final numbers too, as of the last event.
    assert_eq!(last_stats[0]["as_of"], json!(i1.last().unwrap()));
    assert_eq!(last_stats[0]["as_of"], last_stats[1]["as_of"]);
    assert_eq!(last_stats[0]["as_of"], last_stats[2]["as_of"]);
    for d in [d1, d2, d3] {
        d.stop().await;
    }
}

struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("this test needs nginx: `apt-get install -y nginx-light` (bash .ci/run installs it)");
}

async fn start_nginx(upstreams: &[SocketAddr]) -> Nginx {
    let dir = std::env::temp_dir().join(format!("citapulse-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    // The shipped example, with this test's addresses and paths: what users deploy is
    // what is tested.
    let example = std::fs::read_to_string("deploy/nginx.conf").unwrap();
    let servers: String = upstreams
        .iter()
        .map(|a| format!("        server {a} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    let d = dir.display();
    let mut conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
    );
    let mut in_upstream = false;
    for line in example.lines() {
        let t = line.trim();
        if t.starts_with("worker_processes") {
            conf.push_str("worker_processes 1;\n");
        } else if t.starts_with("upstream ") {
            // Each upstream of the example, with this test's daemons as its servers.
            in_upstream = true;
            conf.push_str(&format!("{line}\n{servers}"));
        } else if in_upstream {
            if t == "}" {
                in_upstream = false;
                conf.push_str("    }\n");
            } else if !t.starts_with("server ") {
                conf.push_str(line);
                conf.push('\n');
            }
        } else if t == "listen 8080;" {
            conf.push_str(&format!("        listen 127.0.0.1:{port};\n"));
        } else if t == "http {" {
            conf.push_str(&format!(
                "http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
            ));
        } else {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx_binary())
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let n = Nginx { child, dir, addr };
    wait_until(|| async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, "/", &[]).await.0 == 200
    })
    .await;
    // Public: the page and its script; the operations endpoints are not.
    assert_eq!(http_get(addr, "/citapulse.js", &[]).await.0, 200);
    // An Engine.IO handshake through the sticky upstream.
    let (status, body) = http_get(addr, "/socket.io/?EIO=4&transport=polling", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sid\""), "{body}");
    for path in ["/health", "/metrics", "/readyz", "/stats", "/notify/cita"] {
        assert_eq!(
            http_get(addr, path, &[]).await.0,
            404,
            "{path} through the proxy"
        );
    }
    n
}

/// A client that, like the JS client, reconnects through the balancer and resumes with
/// `since` until it has every id in `target`. Returns (ids received, reconnects, close codes).
async fn resilient_client(
    lb: SocketAddr,
    tenant: String,
    mut target: watch::Receiver<Option<BTreeSet<i64>>>,
) -> (BTreeSet<i64>, usize, Vec<u16>) {
    let token = tenant_token(&tenant);
    let mut got = BTreeSet::new();
    let mut last: Option<i64> = None;
    let mut reconnects = 0;
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client never got everything"
        );
        let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{lb}/ws?token={token}")).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut sub = json!({"channel": format!("estadisticas:{tenant}")});
        if let Some(s) = last {
            sub["since"] = json!(s);
        }
        if ws
            .send(Message::Text(
                json!({"type": "subscribe", "data": sub}).to_string().into(),
            ))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let done = target.borrow().as_ref().is_some_and(|t| t.is_subset(&got));
            if done {
                let _ = ws.close(None).await;
                return (got, reconnects, codes);
            }
            let next = tokio::select! {
                m = ws.next() => m,
                _ = target.changed() => continue,
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if let Some(id) = v["id"].as_i64() {
                        got.insert(id);
                        last = Some(id);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    if let Some(f) = frame {
                        codes.push(u16::from(f.code));
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        reconnects += 1;
        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..100))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_or_draining_an_instance_behind_nginx_loses_no_event() {
    let db = TestDb::new().await;
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let mut daemons = Vec::new();
    for a in &addrs {
        daemons.push(ProcDaemon::start(&db.url, *a, &[]).await);
    }
    let lb = start_nginx(&addrs).await;

    let (target_tx, target_rx) = watch::channel(None);
    let clients: Vec<_> = (0..6)
        .map(|_| tokio::spawn(resilient_client(lb.addr, "t1".into(), target_rx.clone())))
        .collect();
    // Wait until every instance serves someone.
    wait_until(|| async {
        let mut all = true;
        for a in &addrs {
            let (_, body) = http_get(*a, "/health", &[]).await;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            all &= v["connections"].as_i64().unwrap_or(0) >= 1;
        }
        all
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = db.url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = pg(&url).await;
            while !stop.load(Ordering::Relaxed) {
                client
                    .execute(
                        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'lb')",
                        &[],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemons[0].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Drain another for a rolling deploy: its clients get 1001 and move to the last one.
    assert!(daemons[1].terminate().await.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let committed: BTreeSet<i64> = db.event_ids("t1").await.into_iter().collect();
    target_tx.send_replace(Some(committed.clone()));
    let mut total_reconnects = 0;
    let mut saw_1001 = false;
    for c in clients {
        let (got, reconnects, codes) = c.await.unwrap();
        assert!(
            committed.is_subset(&got),
            "a client missed {:?}",
            committed.difference(&got).collect::<Vec<_>>()
        );
        total_reconnects += reconnects;
        saw_1001 |= codes.contains(&1001);
    }
    eprintln!(
        "instance loss behind nginx: committed {} events, each of 6 clients received all of them; {} reconnects",
        committed.len(),
        total_reconnects
    );
    assert!(
        total_reconnects >= 2,
        "clients of the killed and drained instances reconnected"
    );
    assert!(saw_1001, "drained clients were told 1001 going away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_follow_one_wakeup_mode_through_switches_without_loss() {
    let db = TestDb::new().await;
    let tweak = |c: &mut citapulse::Config| {
        c.wakeup.mode = citapulse::config::WakeupMode::Adaptive;
        c.wakeup.poll_above_per_sec = 40;
        c.wakeup.notify_below_per_sec = 5;
        c.wakeup.hold_secs = 1;
        c.wakeup.safety_poll_ms = 200;
    };
    let daemons = [
        Daemon::start(&db.url, tweak).await,
        Daemon::start(&db.url, tweak).await,
        Daemon::start(&db.url, tweak).await,
    ];
    let mut clients = Vec::new();
    for d in &daemons {
        clients.push(WsClient::subscribed(d.addr, "t1").await);
    }
    let switches = || async {
        let mut n = 0.0;
        for d in &daemons {
            n += d.metric("citapulse_wakeup_switches_total").await;
        }
        n
    };
    let writer = pg(&db.url).await;
    let mut rounds = 0;
    while switches().await < 1.0 {
        for _ in 0..100 {
            writer
                .execute("INSERT INTO citas (negocio_id) VALUES ('t1')", &[])
                .await
                .unwrap();
        }
        rounds += 1;
        assert!(rounds < 100, "never switched to poll");
    }
    // Every instance sees the shared mode.
    for d in &daemons {
        let (_, body) = http_get(d.addr, "/health", &[]).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["wakeup"] != "poll" {
            wait_until(|| async {
                let (_, body) = http_get(d.addr, "/health", &[]).await;
                serde_json::from_str::<Value>(&body).unwrap()["wakeup"] == "poll"
            })
            .await;
        }
    }
    let mut rounds = 0;
    while switches().await < 2.0 {
        writer
            .execute("INSERT INTO citas (negocio_id) VALUES ('t1')", &[])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        rounds += 1;
        assert!(rounds < 200, "never switched back to notify");
    }
    let committed: BTreeSet<i64> = db.event_ids("t1").await.into_iter().collect();
    for c in &mut clients {
        let mut got = BTreeSet::new();
        while got.len() < committed.len() {
            let ev = c.expect(|m| m.get("id").is_some_and(Value::is_i64)).await;
            assert!(got.insert(ev["id"].as_i64().unwrap()), "duplicate");
        }
        assert_eq!(got, committed);
    }
    eprintln!(
        "mode switches across 3 instances: {} events, all delivered to every instance's client",
        committed.len()
    );
    for d in daemons {
        d.stop().await;
    }
}
