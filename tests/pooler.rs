//! Connection poolers: `database.session_url` beside `database.url`, and a session URL
//! through a transaction-mode pooler refused at start. Runs a real PgBouncer in front of
//! the test server (Debian's `pgbouncer`; `.ci/run` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use citapulse::config::Secret;
use support::*;

/// A PgBouncer in front of the test server, on a loopback port of its own.
struct PgBouncer {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // As root the child is `runuser`, whose death PgBouncer would outlive: stop
        // PgBouncer itself, by the pid it wrote.
        if let Some(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
        {
            let _ = citapulse_testkit::process::send_signal(pid, libc::SIGTERM);
            // `runuser` reaps it and exits (bounded: then it is killed below).
            for _ in 0..200 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pgbouncer_binary() -> PathBuf {
    for p in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("this test needs PgBouncer: `apt-get install -y pgbouncer` (bash .ci/run installs it)");
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode` in front of the server `url` points at.
    async fn start(url: &str, pool_mode: &str) -> Self {
        let server: tokio_postgres::Config = url.parse().unwrap();
        let host = match server.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            other => panic!("PgBouncer test needs a TCP server, not {other:?}"),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let user = server.get_user().unwrap_or("postgres").to_string();
        let password = server
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "citapulse-pgbouncer-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let d = dir.display();
        // Trust from the clients; the server login uses the password in the user list.
        std::fs::write(
            dir.join("users.txt"),
            format!("\"{user}\" \"{password}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={host} port={server_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = {pool_mode}\n\
                 default_pool_size = 20\nmax_client_conn = 200\nlogfile = {d}/pgbouncer.log\n\
                 pidfile = {d}/pgbouncer.pid\n\
                 ignore_startup_parameters = extra_float_digits,options\nadmin_users = {user}\n"
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root: as PostgreSQL does, it runs as `postgres`.
        let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let mut cmd = if root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown the PgBouncer directory");
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pgbouncer_binary());
            c
        } else {
            Command::new(pgbouncer_binary())
        };
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_until(|| async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
        Self { child, dir, port }
    }

    /// The `application_name` of every client connected to this PgBouncer (its admin
    /// console's SHOW CLIENTS).
    async fn client_names(&self, url: &str) -> Vec<String> {
        let server: tokio_postgres::Config = url.parse().unwrap();
        let user = server.get_user().unwrap_or("postgres");
        let admin = format!("postgres://{user}@127.0.0.1:{}/pgbouncer", self.port);
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .expect("PgBouncer's admin console");
        tokio::spawn(conn);
        let mut names = Vec::new();
        for m in client.simple_query("SHOW CLIENTS").await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m
                && let Some(Some(name)) = r
                    .columns()
                    .iter()
                    .position(|c| c.name() == "application_name")
                    .map(|i| r.get(i))
            {
                names.push(name.to_string());
            }
        }
        names
    }

    /// `url` with the host and port of this PgBouncer.
    fn url(&self, url: &str) -> String {
        let server: tokio_postgres::Config = url.parse().unwrap();
        let user = server.get_user().unwrap_or("postgres");
        let db = server.get_dbname().unwrap_or(user);
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }
}

/// What the daemon says when it will not start.
async fn start_error(c: citapulse::config::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(WAIT, citapulse::run(listener, c, std::future::pending()))
        .await
        .expect("the daemon gives up in time");
    let err = result.expect_err("the daemon must refuse to start");
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn a_session_url_through_a_transaction_pooler_is_refused_with_what_to_change() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start(&db.url, "transaction").await;
    let pooled = bouncer.url(&db.url);

    // The pooler in database.url, no session_url: the session connections would use it.
    let text = start_error(config(&pooled)).await;
    assert!(
        text.contains("database.url goes through a transaction-mode pooler")
            && text.contains("database.session_url"),
        "{text}"
    );

    // The same pooler named as the session URL.
    let mut c = config(&db.url);
    c.database.session_url = Some(Secret::new(&pooled));
    let text = start_error(c).await;
    assert!(
        text.contains("database.session_url goes through a transaction-mode pooler"),
        "{text}"
    );

    // `citapulse check` says so too, and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_citapulse"))
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("CITAPULSE_DATABASE__SESSION_URL", &pooled)
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("session connections: PROBLEM: database.session_url goes through a transaction-mode pooler"),
        "{stdout}"
    );
}

#[tokio::test]
async fn sessions_through_a_session_pooler_and_queries_through_a_transaction_pooler_deliver() {
    let db = TestDb::new().await;
    let session_pooler = PgBouncer::start(&db.url, "session").await;
    let transaction_pooler = PgBouncer::start(&db.url, "transaction").await;
    let d = Daemon::start(&transaction_pooler.url(&db.url), |c| {
        c.database.session_url = Some(Secret::new(session_pooler.url(&db.url)));
    })
    .await;
    let mut ws = WsClient::subscribed(d.addr, "pool_t").await;
    db.insert_cita("pool_t", "pendiente").await;
    let event = ws.expect_type("cita_created").await;
    assert_eq!(event["channel"], "estadisticas:pool_t", "{event}");
    ws.stats_until(|s| s["total_citas"] == 1).await;

    // The reader and the reminders leader hold their sessions through the session
    // pooler; pooled queries go through the other one.
    let session_clients = session_pooler.client_names(&db.url).await;
    assert!(
        session_clients.iter().any(|n| n == "citapulse-listener")
            && session_clients.iter().any(|n| n == "citapulse-reminders"),
        "{session_clients:?}"
    );
    let pooled_clients = transaction_pooler.client_names(&db.url).await;
    assert!(
        !pooled_clients.iter().any(|n| n == "citapulse-listener"),
        "{pooled_clients:?}"
    );
    assert!(
        pooled_clients.iter().any(|n| n == "citapulse"),
        "{pooled_clients:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_bad_session_url_is_named_at_start() {
    let db = TestDb::new().await;
    let mut c = config(&db.url);
    c.database.session_url = Some(Secret::new(format!("{}?sslmode=sometimes", db.url)));
    let text = start_error(c).await;
    assert!(text.contains("database.session_url: sslmode"), "{text}");

    let mut c = config(&db.url);
    c.database.session_url = Some(Secret::new("   "));
    let text = start_error(c).await;
    assert!(text.contains("database.session_url"), "{text}");

    // The daemon writes: a standby is never a target, and libpq's `primary` works.
    let mut c = config(&db.url);
    c.database.session_url = Some(Secret::new(format!(
        "{}?target_session_attrs=standby",
        db.url
    )));
    let text = start_error(c).await;
    assert!(
        text.contains("database.session_url: target_session_attrs=\"standby\""),
        "{text}"
    );
    let d = Daemon::start(&format!("{}?target_session_attrs=primary", db.url), |_| {}).await;
    d.stop().await;
}
