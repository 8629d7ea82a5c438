//! TLS to PostgreSQL (DESIGN.md §11): a cluster with `ssl=on`, certificates of a private CA
//! made by rcgen (server certificate for `localhost` only, a client certificate), and a
//! `pg_hba.conf` that takes TLS connections only (`cert` for one role). libpq's
//! `sslmode` values are accepted and refused as libpq would; the daemon serves events
//! over it; errors name the parameter and never the password.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use citapulse_testkit::{ClusterOptions, PgCluster};
use support::*;

/// Files of a private CA, a server certificate for `localhost` and a client certificate
/// for the role `certuser`; and another CA that signed nothing of the server's.
struct Certs {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The server must own its key (mode 0600): when the tests run as root, the server runs
/// as `postgres`.
fn give_to_server(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if is_root {
        let uid = Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .unwrap();
        let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
        std::os::unix::fs::chown(path, Some(uid), None).unwrap();
    }
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(params, key).unwrap()
}

fn certs() -> Certs {
    let dir = std::env::temp_dir().join(format!(
        "citapulse-tls-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    give_to_server(&dir, 0o755);
    let ca_issuer = ca("citapulse test CA");
    let other = ca("another CA");
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&server_key, &ca_issuer)
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "certuser");
    let client = client_params.signed_by(&client_key, &ca_issuer).unwrap();
    let certs = Certs {
        ca: write(&dir, "ca.pem", &ca_issuer.pem()),
        other_ca: write(&dir, "other-ca.pem", &other.pem()),
        client_cert: write(&dir, "client.pem", &client.pem()),
        client_key: write(&dir, "client.key", &client_key.serialize_pem()),
        dir,
    };
    for (name, text) in [
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
    ] {
        give_to_server(&write(&certs.dir, name, &text), 0o600);
    }
    give_to_server(&certs.ca, 0o644);
    certs
}

/// A cluster with TLS on; after `tls_only`, TCP connections must use TLS, and `certuser`
/// must present a certificate of the CA.
async fn tls_cluster(certs: &Certs) -> PgCluster {
    let hba = write(
        &certs.dir,
        "pg_hba.conf",
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    );
    give_to_server(&hba, 0o644);
    let path = |name: &str| certs.dir.join(name).display().to_string();
    PgCluster::start(ClusterOptions {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), path("server.pem")),
            ("ssl_key_file".into(), path("server.key")),
            ("ssl_ca_file".into(), path("ca.pem")),
            ("hba_file".into(), path("pg_hba.conf")),
        ],
        keep: false,
    })
    .await
    .expect("start a cluster with ssl=on")
}

/// Only TLS from now on (the harness's own set-up used plain TCP before).
async fn tls_only(db: &TestDb, certs: &Certs) {
    std::fs::write(
        certs.dir.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         hostssl all scramuser 127.0.0.1/32 scram-sha-256\n\
         hostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    db.client
        .batch_execute(
            "CREATE ROLE certuser LOGIN; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scramuser LOGIN PASSWORD 'scram-pass'; \
             SELECT pg_reload_conf()",
        )
        .await
        .unwrap();
    // The reload is asynchronous: wait until a plain connection is refused.
    let plain = db.url.clone() + "?sslmode=disable";
    wait_until(|| async {
        tokio_postgres::connect(&plain, tokio_postgres::NoTls)
            .await
            .is_err()
    })
    .await;
}

fn with(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// Connects as the daemon does; Ok(whether the session is encrypted) or the error's text.
async fn daemon_connect(url: &str) -> Result<bool, String> {
    match citapulse::db::connect(&config(url)).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(citapulse::db::session_tls(&client).await.unwrap())
        }
        Err(e) => Err(report(&e)),
    }
}

fn report(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[tokio::test]
async fn sslmodes_connect_and_refuse_as_libpq_does() {
    let certs = certs();
    let cluster = tls_cluster(&certs).await;
    let db = TestDb::on_cluster(&cluster).await;
    tls_only(&db, &certs).await;
    let by_ip = db.url.clone();
    let by_name = by_ip.replace("127.0.0.1", "localhost");
    let ca = certs.ca.display();
    let other = certs.other_ca.display();

    // Encrypted without checks; prefer takes TLS when offered.
    assert_eq!(
        daemon_connect(&with(&by_ip, "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        daemon_connect(&by_ip).await,
        Ok(true),
        "prefer is the default"
    );
    // The chain by IP (verify-ca ignores the name); the name too by its name.
    assert_eq!(
        daemon_connect(&with(
            &by_ip,
            &format!("sslmode=verify-ca&sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    assert_eq!(
        daemon_connect(&with(
            &by_name,
            &format!("sslmode=verify-full&sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    // The certificate names localhost, not 127.0.0.1.
    let err = daemon_connect(&with(
        &by_ip,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(
        err.contains("name mismatch") && err.contains("sslmode=verify-full"),
        "{err}"
    );
    // Another CA: refused by verify-ca, and by require with that root (as libpq).
    for mode in ["verify-ca", "require"] {
        let err = daemon_connect(&with(
            &by_name,
            &format!("sslmode={mode}&sslrootcert={other}"),
        ))
        .await
        .unwrap_err();
        assert!(err.contains("unknown issuer"), "{mode}: {err}");
    }
    // SCRAM with channel binding (tls-server-end-point) over the TLS session; required
    // binding against a login that does not use SCRAM is refused, as libpq does.
    let scram = by_ip.replace("postgres@", "scramuser:scram-pass@");
    assert_eq!(
        daemon_connect(&with(&scram, "sslmode=require&channel_binding=require")).await,
        Ok(true)
    );
    let err = daemon_connect(&with(&by_ip, "sslmode=require&channel_binding=require"))
        .await
        .unwrap_err();
    assert!(err.contains("channel binding"), "{err}");
    // No TLS at all: the server refuses (only hostssl lines).
    let err = daemon_connect(&with(&by_ip, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        err.contains("no encryption") || err.contains("pg_hba"),
        "{err}"
    );
    // verify-* needs roots; a missing file is named; no password is shown.
    let secret = by_ip.replace("postgres@", "postgres:hunter2@");
    let err = daemon_connect(&with(&secret, "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(err.contains("sslrootcert"), "{err}");
    let err = daemon_connect(&with(
        &secret,
        "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(err.contains("sslrootcert=/nonexistent/ca.pem"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    // A client certificate for a role that authenticates with one; key=value form.
    let kv = format!(
        "host=localhost port={} dbname={} user=certuser sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
        cluster.port(),
        by_ip.rsplit('/').next().unwrap(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    assert_eq!(daemon_connect(&kv).await, Ok(true));
    let without = format!(
        "host=localhost port={} dbname={} user=certuser sslmode=verify-full sslrootcert={ca}",
        cluster.port(),
        by_ip.rsplit('/').next().unwrap()
    );
    let err = daemon_connect(&without).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&certs.dir);
}

#[tokio::test]
async fn the_daemon_delivers_over_verified_tls_and_says_so() {
    let certs = certs();
    let cluster = tls_cluster(&certs).await;
    let db = TestDb::on_cluster(&cluster).await;
    tls_only(&db, &certs).await;
    let url = with(
        &db.url.replace("127.0.0.1", "localhost"),
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca.display()),
    );
    // Sessions (the reader, leaders) by IP with the chain checked; the pool by name.
    let session_url = with(
        &db.url,
        &format!("sslmode=verify-ca&sslrootcert={}", certs.ca.display()),
    );
    let session = session_url.clone();
    let d = Daemon::start(&url, move |c| {
        c.database.session_url = Some(citapulse::config::Secret::new(session));
    })
    .await;
    let (_, body) = http_get(d.addr, "/health", &[]).await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["database_tls"], true, "{health}");
    assert_eq!(d.metric("citapulse_database_tls").await, 1.0);
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    // The test's own client is plain TCP, refused now: write over TLS as the daemon does.
    let (writer, connection) = citapulse::db::connect(&config(&url)).await.unwrap();
    tokio::spawn(connection);
    writer
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'over-tls')",
            &[],
        )
        .await
        .unwrap();
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["data"]["row"]["cliente_id"], "over-tls");

    // `citapulse check` says how each kind of connection is protected, and what the
    // server says of the running daemon's.
    let out = Command::new(env!("CARGO_BIN_EXE_citapulse"))
        .arg("check")
        .env("DATABASE_URL", &url)
        .env("CITAPULSE_DATABASE__SESSION_URL", &session_url)
        .env("JWT_SECRET", SECRET)
        .env_remove("CITAPULSE_CONFIG")
        .current_dir(&certs.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "tls: pool connections (database.url): TLS, certificate and host name verified (sslmode=verify-full); this session is encrypted",
        "tls: session connections (database.session_url: LISTEN, leader locks, WAL stream): TLS, certificate chain verified (not the host name) (sslmode=verify-ca); this session is encrypted",
        "session connections: each keeps its own server process (no transaction pooler)",
        "running daemons: citapulse-listener: 1 connections, 1 encrypted",
    ] {
        assert!(
            stdout.contains(line),
            "{line}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.stop().await;
    let _ = std::fs::remove_dir_all(&certs.dir);
}

#[tokio::test]
async fn wal_capture_streams_over_verified_tls() {
    let certs = certs();
    let cluster = tls_cluster(&certs).await;
    let db = TestDb::on_cluster(&cluster).await;
    let slot = db.url.rsplit('/').next().unwrap().to_string();
    db.client
        .query_one("SELECT citapulse.capture_mode('wal', $1)", &[&slot])
        .await
        .unwrap();
    tls_only(&db, &certs).await;
    let url = with(
        &db.url.replace("127.0.0.1", "localhost"),
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca.display()),
    );
    let d = Daemon::start(&url, |c| c.capture.slot = slot.clone()).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let (writer, connection) = citapulse::db::connect(&config(&url)).await.unwrap();
    tokio::spawn(connection);
    writer
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'wal-over-tls')",
            &[],
        )
        .await
        .unwrap();
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["data"]["row"]["cliente_id"], "wal-over-tls");
    // The stream's own session is encrypted, as the server sees it.
    let streams: i64 = writer
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid WHERE s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streams, 1);
    d.stop().await;
    let _ = std::fs::remove_dir_all(&certs.dir);
}
