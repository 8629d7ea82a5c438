//! The reference dashboard in a real headless Chromium, driven over the DevTools protocol:
//! numbers change when a row is inserted with SQL, the page recovers by itself after
//! the daemon restarts, it shows who is online in its tenant (presence), and it lists
//! reminders with the names `[[enrich]]` looked up. Needs Debian's `chromium` (`.ci/run`
//! installs it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn chromium_path() -> PathBuf {
    for p in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("this test needs Chromium: `apt-get install -y chromium` (bash .ci/run installs it)");
}

struct Browser {
    child: Child,
    dir: PathBuf,
    /// One browser at a time: three Chromium start-ups at once on two busy cores can
    /// take longer than any sensible wait.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DevTools session on one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(Message::Text(
                json!({"id": id, "method": method, "params": params})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("devtools answer")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    async fn text(&mut self, element_id: &str) -> String {
        self.query_text(&format!("#{element_id}")).await
    }

    async fn wait_text(&mut self, element_id: &str, want: &str) {
        self.wait_text_where(element_id, &format!("{want:?}"), |got| got == want)
            .await;
    }

    /// Waits until the text of `#element_id` satisfies `ok` (`what` describes it on failure).
    async fn wait_text_where(&mut self, element_id: &str, what: &str, ok: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.text(element_id).await;
            if ok(&got) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "#{element_id} is {got:?}, expected {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching a CSS selector ("" if none).
    async fn query_text(&mut self, selector: &str) -> String {
        let expr = format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        );
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

async fn launch() -> (Browser, Page) {
    let turn = ONE_BROWSER.lock().await;
    // One profile per browser: the tests of this binary run in parallel.
    static BROWSERS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "citapulse-chromium-{}-{}",
        std::process::id(),
        BROWSERS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(chromium_path())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let browser = Browser {
        child,
        dir: dir.clone(),
        _turn: turn,
    };
    let port_file = dir.join("DevToolsActivePort");
    // Chromium's first start with a fresh profile is slow on a loaded machine.
    let started = tokio::time::Instant::now();
    while !std::fs::read_to_string(&port_file).is_ok_and(|s| s.lines().count() >= 2) {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "Chromium did not start within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port: u16 = std::fs::read_to_string(&port_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let page_ws = loop {
        let targets = devtools_get(addr, "/json/list").await;
        let found = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
        if let Some(url) = found {
            break url;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no page target in chromium"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (ws, _) = tokio_tungstenite::connect_async(page_ws)
        .await
        .expect("devtools socket");
    (browser, Page { ws, next_id: 0 })
}

/// A JSON GET to Chromium's DevTools HTTP server. It keeps the connection open whatever
/// `Connection: close` says, so the body is read by its `Content-Length`, not to the end
/// (support's `http_get` would wait `WAIT` each time).
async fn devtools_get(addr: std::net::SocketAddr, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            let body = &buf[end + 4..];
            if len.is_some_and(|n| body.len() >= n) {
                return serde_json::from_slice(body).unwrap_or(Value::Null);
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("devtools answer")
            .unwrap();
        if n == 0 {
            return Value::Null;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_numbers_and_recovers_after_a_restart() {
    let db = TestDb::new().await;
    db.insert_cita("t1", "atendida").await;
    let daemon = Daemon::start(&db.url, |_| {}).await;
    let addr = daemon.addr;
    let (_browser, mut page) = launch().await;
    let url = format!("http://{addr}/?tenant=t1&token={}", tenant_token("t1"));
    page.call("Page.navigate", json!({"url": url})).await;
    page.wait_text("state", "open").await;
    page.wait_text("total_citas", "1").await;
    page.wait_text("citas_completadas", "1").await;

    db.insert_cita("t1", "pendiente").await;
    page.wait_text("total_citas", "2").await;
    let first_event = db.event_ids("t1").await.last().copied().unwrap();
    let feed = page
        .call(
            "Runtime.evaluate",
            json!({"expression": format!("!!document.querySelector('#feed [data-id=\"{first_event}\"]')"), "returnByValue": true}),
        )
        .await;
    assert_eq!(
        feed["result"]["value"], true,
        "the event appears in the feed"
    );

    // Restart the daemon on the same port; the page must reconnect by itself.
    daemon.stop().await;
    page.wait_text("state", "reconnecting").await;
    let mut cfg = config(&db.url);
    cfg.listen = addr;
    let daemon = Daemon::start_with(cfg).await;
    page.wait_text("state", "open").await;
    db.insert_cita("t1", "cancelada").await;
    page.wait_text("total_citas", "3").await;
    page.wait_text("citas_canceladas", "1").await;

    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64_decode(shot["data"].as_str().unwrap());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("dashboard.png"), png).unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_who_is_online() {
    const GRACE_MS: u64 = 300;
    let db = TestDb::new().await;
    let daemon = Daemon::start(&db.url, |c| c.presence.leave_grace_ms = GRACE_MS).await;
    let (_browser, mut page) = launch().await;
    let url = format!(
        "http://{}/?tenant=t1&token={}",
        daemon.addr,
        tenant_token("t1")
    );
    page.call("Page.navigate", json!({"url": url})).await;
    page.wait_text("state", "open").await;
    // The page's own user (tenant_token's "user-t1"), from its presence request.
    page.wait_text_where("online", "to list user-t1", |t| t.contains("user-t1"))
        .await;
    page.wait_text("online-count", "1").await;

    // Another user subscribes to the same tenant channel: a presence_join reaches the page.
    let mut other =
        WsClient::connect(daemon.addr, &token("u-online", Some("t1"), Some("staff"))).await;
    other.subscribe("t1", None).await;
    page.wait_text_where("online", "to list u-online", |t| t.contains("u-online"))
        .await;
    page.wait_text("online-count", "2").await;
    let entry = page.query_text("#online li[data-user='u-online']").await;
    assert!(
        entry.contains("staff") && entry.contains("×1"),
        "role and connection count shown: {entry:?}"
    );

    // A user of another tenant is never listed.
    let mut stranger = WsClient::connect(daemon.addr, &token("u-other", Some("t2"), None)).await;
    stranger.subscribe("t2", None).await;

    // It goes: after the leave grace, a presence_leave removes it.
    let gone_at = std::time::Instant::now();
    other.close().await;
    page.wait_text_where("online", "not to list u-online", |t| {
        !t.contains("u-online")
    })
    .await;
    assert!(
        gone_at.elapsed() >= Duration::from_millis(GRACE_MS),
        "left before the grace"
    );
    page.wait_text("online-count", "1").await;
    let listed = page.text("online").await;
    assert!(
        listed.contains("user-t1") && !listed.contains("u-other"),
        "{listed:?}"
    );
    stranger.close().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_reminders_with_enriched_names() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE profesionales (id text PRIMARY KEY, nombre text); \
             INSERT INTO profesionales VALUES ('p1', 'Ana')",
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db.url, |c| {
        c.reminders.minutes_before = vec![15];
        c.enrich = vec![citapulse::config::EnrichConfig {
            kind: "appointment".into(),
            column: "profesional_id".into(),
            query: "SELECT nombre AS profesional_nombre FROM profesionales WHERE id = $1".into(),
            cache_ttl_ms: 5_000,
            timeout_ms: 500,
        }];
    })
    .await;
    let (_browser, mut page) = launch().await;
    let url = format!(
        "http://{}/?tenant=t1&token={}",
        daemon.addr,
        tenant_token("t1")
    );
    page.call("Page.navigate", json!({"url": url})).await;
    page.wait_text("state", "open").await;
    assert_eq!(page.text("reminders").await, "", "no reminder yet");

    // Starts in 15 minutes and 2 seconds (UTC, the default zone): its reminder is due in 2 s.
    let id: i64 = db
        .client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT 't1', 'c1', 'p1', x::date, x::time, 'pendiente' \
               FROM (SELECT (now() AT TIME ZONE 'UTC') + make_interval(mins => 15, secs => 2) AS x) s \
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The cita_created event carries the looked-up name: the feed shows it, not the id.
    page.wait_text_where("feed", "to name the professional", |t| {
        t.contains("prof. Ana")
    })
    .await;

    page.wait_text_where("reminders", "to list the 15-minute reminder", |t| {
        t.contains("15 min")
    })
    .await;
    let entry = page
        .query_text(&format!("#reminders li[data-row='{id}']"))
        .await;
    assert!(
        entry.contains("15 min") && entry.contains("prof. Ana") && entry.contains("cliente c1"),
        "minutes, enriched professional and client id: {entry:?}"
    );
    let starts = page
        .query_text(&format!("#reminders li[data-row='{id}'] .starts"))
        .await;
    assert!(
        !starts.is_empty() && starts != "?" && !starts.contains("+00:00"),
        "starts_at formatted in local time: {starts:?}"
    );
    assert_eq!(
        page.query_text("#feed .badge.reminder").await,
        "cita_reminder",
        "the reminder is in the feed too"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // the entries' slide-in
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("reminders.png"),
        base64_decode(shot["data"].as_str().unwrap()),
    )
    .unwrap();
    daemon.stop().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// A dashboard written for a Socket.IO gateway: a page on another origin that loads the
/// browser build of socket.io-client and connects with `io(url, {auth: {token}})`.
const SOCKETIO_PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>socket.io dashboard</title>
<p>state <span id="state">loading</span> transport <span id="transport"></span></p>
<p>error <span id="error"></span></p>
<ul id="events"></ul>
<script>BUNDLE</script>
<script>
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const socket = io(params.get("daemon"), { auth: { token: params.get("token") }, reconnection: false });
socket.on("connect", () => {
  $("state").textContent = "connected";
  $("transport").textContent = socket.io.engine.transport.name;
  socket.io.engine.on("upgrade", (t) => { $("transport").textContent = t.name; });
});
socket.on("connect_error", (err) => { $("state").textContent = "refused"; $("error").textContent = err.message; });
socket.on("appointment:created", (msg) => {
  const li = document.createElement("li");
  li.dataset.channel = msg.channel;
  li.textContent = "row " + msg.data.row.id + " of " + msg.data.row.negocio_id;
  $("events").appendChild(li);
});
</script>
"#;

/// Serves `html` for every request on a port of its own (another origin than the daemon's).
async fn serve_page(html: String) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let html = std::sync::Arc::new(html);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let html = html.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socketio_dashboard_on_another_origin_gets_its_tenants_events() {
    let bundle = std::fs::read_to_string(
        socketio_client_dir().join("node_modules/socket.io-client/dist/socket.io.min.js"),
    )
    .unwrap();
    // `</script` cannot occur in the bundle, or the inline script would end there.
    assert!(!bundle.contains("</script"));
    let (page_addr, server) = serve_page(SOCKETIO_PAGE.replace("BUNDLE", &bundle)).await;
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.socketio
            .events
            .insert("cita_created".into(), "appointment:created".into());
    })
    .await;
    let (_browser, mut page) = launch().await;

    // Polling first (cross-origin, so the daemon's CORS answers are used), then the upgrade.
    let open = |token: &str| format!("http://{page_addr}/?daemon=http://{}&token={token}", d.addr);
    page.call("Page.navigate", json!({"url": open(&tenant_token("t1"))}))
        .await;
    page.wait_text("state", "connected").await;
    page.wait_text("transport", "websocket").await;
    wait_until(|| async { d.metric("citapulse_socketio_connections").await == 1.0 }).await;

    // Another tenant's row first: had it reached the page, it would be listed before ours.
    let theirs = db.insert_cita("t2", "pendiente").await;
    let mine = db.insert_cita("t1", "pendiente").await;
    let want = format!("row {mine} of t1");
    page.wait_text_where("events", &format!("to list {want:?}"), |t| {
        t.contains(&want)
    })
    .await;
    let listed = page.text("events").await;
    assert!(
        !listed.contains(&format!("row {theirs} ")) && !listed.contains("of t2"),
        "t2's row reached a t1 page: {listed:?}"
    );
    let channel = page
        .query_text("#events li[data-channel='estadisticas:t1']")
        .await;
    assert_eq!(channel, want, "the event names its channel");

    // A forged token: the browser's client gets a connect_error with the code.
    page.call("Page.navigate", json!({"url": open("not-a-jwt")}))
        .await;
    page.wait_text("state", "refused").await;
    assert_eq!(page.text("error").await, "token_invalid");

    server.abort();
    d.stop().await;
}
