//! JWKS and key rotation (DESIGN.md §10): keys by `kid` from `auth.jwks_url` (a local
//! HTTP endpoint serving a rotating set) and `auth.jwks_file` with SIGHUP; algorithms
//! stay pinned; a removed key is refused at the next handshake and `auth` refresh while
//! open sockets stay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;

fn secret(kid: &str) -> Vec<u8> {
    format!("jwks-test-secret-of-{kid}-0123456789").into_bytes()
}

fn jwk(kid: &str, alg: &str) -> Value {
    jwk_with(kid, alg, &secret(kid))
}

/// An HMAC key of `kid` with a chosen secret.
fn jwk_with(kid: &str, alg: &str, secret: &[u8]) -> Value {
    json!({"kty": "oct", "kid": kid, "alg": alg,
           "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)})
}

fn set(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// An HS256 token of `sub` in t1 signed with `kid`'s secret.
fn token_with(kid: &str, alg: Algorithm) -> String {
    token_signed(kid, alg, &secret(kid))
}

/// A token of u1 in t1 naming `kid`, signed with `secret`.
fn token_signed(kid: &str, alg: Algorithm, secret: &[u8]) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "u1", "negocio_id": "t1", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// Serves whatever `doc` holds at any path, one response per connection.
async fn jwks_server(doc: Arc<Mutex<String>>) -> SocketAddr {
    serve_jwks(doc, None).await
}

/// The same over TLS with `tls`'s certificate.
async fn serve_jwks(doc: Arc<Mutex<String>>, tls: Option<Arc<ServerConfig>>) -> SocketAddr {
    counted_jwks(doc, tls, Arc::new(AtomicUsize::new(0))).await
}

/// The same, counting the documents served in `fetches`.
async fn counted_jwks(
    doc: Arc<Mutex<String>>,
    tls: Option<Arc<ServerConfig>>,
    fetches: Arc<AtomicUsize>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let body = doc.lock().unwrap().clone();
            fetches.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    // A client that refuses the certificate ends the handshake: nothing to serve.
                    Some(a) => {
                        if let Ok(tls) = a.accept(sock).await {
                            respond(tls, &body).await;
                        }
                    }
                    None => respond(sock, &body).await,
                }
            });
        }
    });
    addr
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, body: &str) {
    let mut buf = [0u8; 4096];
    let _ = sock.read(&mut buf).await;
    let res = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(res.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// A private CA (its PEM) and a server certificate for 127.0.0.1 and localhost it signed.
fn private_ca() -> (String, Arc<ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "citapulse test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let server = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (ca.pem(), Arc::new(server))
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "citapulse-jwks-{}-{:08x}-{name}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

async fn accepted(addr: SocketAddr, token: &str) -> bool {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}")).await {
        Ok((mut ws, _)) => {
            let _ = ws.close(None).await;
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn keys_rotate_through_a_jwks_url() {
    let db = TestDb::new().await;
    let doc = Arc::new(Mutex::new(set(&[jwk("k1", "HS256")])));
    let jwks = jwks_server(doc.clone()).await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.jwks_url = Some(format!("http://{jwks}/.well-known/jwks.json"));
        c.auth.jwks_allow_hmac = true;
        c.auth.jwks_refresh_secs = 1;
    })
    .await;
    let old = token_with("k1", Algorithm::HS256);
    assert!(accepted(d.addr, &old).await);
    // A kid nobody published yet: 401.
    let new = token_with("k2", Algorithm::HS256);
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={new}"), &[]).await,
        401
    );
    // Pinned algorithms: a key the set calls HS512 is not used while only HS256 is accepted.
    *doc.lock().unwrap() = set(&[jwk("k1", "HS256"), jwk("k2", "HS256"), jwk("k3", "HS512")]);
    wait_until(|| async { accepted(d.addr, &new).await }).await;
    assert!(accepted(d.addr, &old).await, "the old key is still listed");
    let k3 = token_with("k3", Algorithm::HS512);
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={k3}"), &[]).await,
        401
    );
    // A token claiming another algorithm for a listed kid is refused too.
    let wrong_alg = {
        let mut header = Header::new(Algorithm::HS384);
        header.kid = Some("k2".into());
        let now = 2_000_000_000u64;
        jsonwebtoken::encode(
            &header,
            &json!({"sub": "u1", "exp": now}),
            &EncodingKey::from_secret(&secret("k2")),
        )
        .unwrap()
    };
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={wrong_alg}"), &[]).await,
        401
    );

    // k1 removed: refused at the next handshake and at `auth`; an open socket stays.
    let mut open = WsClient::connect(d.addr, &old).await;
    *doc.lock().unwrap() = set(&[jwk("k2", "HS256")]);
    wait_until(|| async { !accepted(d.addr, &old).await }).await;
    open.send(json!({"type": "auth", "data": {"token": old}}))
        .await;
    assert_eq!(
        open.expect_type("error").await["data"]["code"],
        "unauthorized"
    );
    open.send(json!({"type": "ping"})).await;
    open.expect_type("pong").await;
    open.send(json!({"type": "auth", "data": {"token": new}}))
        .await;
    assert_eq!(
        open.expect_type("authenticated").await["type"],
        "authenticated"
    );
    d.stop().await;
}

#[tokio::test]
async fn sighup_reads_the_jwks_file_again_without_dropping_sockets() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("citapulse-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, set(&[jwk("k1", "HS256")])).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut d = ProcDaemon::start(
        &db.url,
        addr,
        &[
            ("CITAPULSE_AUTH__JWKS_FILE", file.to_str().unwrap()),
            ("CITAPULSE_AUTH__JWKS_REFRESH_SECS", "3600"),
        ],
    )
    .await;
    let old = token_with("k1", Algorithm::HS256);
    let new = token_with("k2", Algorithm::HS256);
    let mut open = WsClient::connect(addr, &old).await;
    assert_eq!(
        refused_status(addr, &format!("/ws?token={new}"), &[]).await,
        401
    );
    std::fs::write(&file, set(&[jwk("k2", "HS256")])).unwrap();
    d.signal("HUP");
    wait_until(|| async { accepted(addr, &new).await }).await;
    assert_eq!(
        refused_status(addr, &format!("/ws?token={old}"), &[]).await,
        401
    );
    open.send(json!({"type": "ping"})).await;
    open.expect_type("pong").await;
    // A file that stops parsing keeps the keys read before.
    std::fs::write(&file, "{not json").unwrap();
    d.signal("HUP");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(accepted(addr, &new).await);
    d.terminate().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_https_jwks_is_trusted_through_its_ca_and_refused_without_it() {
    let db = TestDb::new().await;
    let (ca_pem, tls) = private_ca();
    let doc = Arc::new(Mutex::new(set(&[jwk("k1", "HS256")])));
    let jwks = serve_jwks(doc.clone(), Some(tls)).await;
    let url = format!("https://{jwks}/.well-known/jwks.json");

    // The private CA is not among the built-in roots: the daemon does not start, and says why.
    let start = |ca_file: Option<std::path::PathBuf>| {
        let mut c = config(&db.url);
        c.auth.jwks_url = Some(url.clone());
        c.auth.jwks_allow_hmac = true;
        c.auth.jwks_ca_file = ca_file;
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tokio::time::timeout(WAIT, citapulse::run(listener, c, std::future::pending()))
                .await
                .expect("start-up ends")
                .expect_err("a JWKS that cannot be read stops start-up")
                .to_string()
        }
    };
    let err = start(None).await;
    assert!(
        err.contains("auth.jwks_url") && err.contains("certificate"),
        "{err}"
    );
    let not_pem = temp_file("not.pem", "not a certificate\n");
    let err = start(Some(not_pem.clone())).await;
    assert!(
        err.contains("auth.jwks_ca_file") && err.contains("no certificate"),
        "{err}"
    );

    // With the CA trusted: keys by kid over https, and a rotation picked up.
    let ca_file = temp_file("ca.pem", &ca_pem);
    let d = Daemon::start(&db.url, |c| {
        c.auth.jwks_url = Some(url.clone());
        c.auth.jwks_allow_hmac = true;
        c.auth.jwks_ca_file = Some(ca_file.clone());
        c.auth.jwks_refresh_secs = 1;
    })
    .await;
    assert!(accepted(d.addr, &token_with("k1", Algorithm::HS256)).await);
    *doc.lock().unwrap() = set(&[jwk("k2", "HS256")]);
    let new = token_with("k2", Algorithm::HS256);
    wait_until(|| async { accepted(d.addr, &new).await }).await;
    assert!(!accepted(d.addr, &token_with("k1", Algorithm::HS256)).await);
    d.stop().await;
    for f in [not_pem, ca_file] {
        let _ = std::fs::remove_file(f);
    }
}

/// A daemon's start-up error with `tweak` (it must not start).
async fn start_error(db: &TestDb, tweak: impl FnOnce(&mut citapulse::config::Config)) -> String {
    let mut c = config(&db.url);
    tweak(&mut c);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::time::timeout(WAIT, citapulse::run(listener, c, std::future::pending()))
        .await
        .expect("start-up ends")
        .expect_err("start-up is refused")
        .to_string()
}

#[tokio::test]
async fn hmac_keys_of_a_jwks_are_16_bytes_or_more_and_not_taken_from_a_url_by_default() {
    let db = TestDb::new().await;
    // A local file may carry HMAC keys, but none shorter than auth.jwt_secret may be.
    let file = temp_file(
        "weak.json",
        &set(&[
            jwk_with("empty", "HS256", b""),
            jwk_with("one", "HS256", b"x"),
            jwk_with("fifteen", "HS256", b"0123456789abcde"),
            jwk("ok", "HS256"),
        ]),
    );
    let d = Daemon::start(&db.url, |c| c.auth.jwks_file = Some(file.clone())).await;
    for (kid, key) in [
        ("empty", &b""[..]),
        ("one", &b"x"[..]),
        ("fifteen", &b"0123456789abcde"[..]),
    ] {
        let t = token_signed(kid, Algorithm::HS256, key);
        assert_eq!(
            refused_status(d.addr, &format!("/ws?token={t}"), &[]).await,
            401,
            "{kid}"
        );
    }
    assert!(accepted(d.addr, &token_with("ok", Algorithm::HS256)).await);
    d.stop().await;
    let _ = std::fs::remove_file(file);

    // A URL publishes public keys: a shared secret there is ignored unless allowed.
    let doc = Arc::new(Mutex::new(set(&[jwk("k1", "HS256")])));
    let jwks = jwks_server(doc.clone()).await;
    let url = format!("http://{jwks}/.well-known/jwks.json");
    let d = Daemon::start(&db.url, |c| c.auth.jwks_url = Some(url.clone())).await;
    let k1 = token_with("k1", Algorithm::HS256);
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={k1}"), &[]).await,
        401
    );
    d.stop().await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.jwks_url = Some(url.clone());
        c.auth.jwks_allow_hmac = true;
    })
    .await;
    assert!(accepted(d.addr, &k1).await);
    d.stop().await;
}

#[tokio::test]
async fn a_jwks_naming_one_kid_twice_is_refused_and_the_keys_read_before_kept() {
    let db = TestDb::new().await;
    let attacker = b"attacker-chosen-secret-0123456789".to_vec();
    let twice = set(&[
        jwk("k1", "HS256"),
        jwk_with("k1", "HS256", &attacker),
        jwk("k2", "HS256"),
    ]);
    // At start: the daemon does not start, and names the kid.
    let file = temp_file("twice.json", &twice);
    let err = start_error(&db, |c| c.auth.jwks_file = Some(file.clone())).await;
    assert!(err.contains("k1") && err.contains("twice"), "{err}");
    let _ = std::fs::remove_file(file);

    // At a refresh: the new set is refused whole, the one read before stays.
    let doc = Arc::new(Mutex::new(set(&[jwk("k1", "HS256")])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks = counted_jwks(doc.clone(), None, fetches.clone()).await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.jwks_url = Some(format!("http://{jwks}/jwks"));
        c.auth.jwks_allow_hmac = true;
        c.auth.jwks_refresh_secs = 1;
    })
    .await;
    assert!(accepted(d.addr, &token_with("k1", Algorithm::HS256)).await);
    *doc.lock().unwrap() = twice;
    // Two fetches after the change: at least one whole refresh read the new set.
    let seen = fetches.load(Ordering::SeqCst);
    wait_until(|| async { fetches.load(Ordering::SeqCst) >= seen + 2 }).await;
    for (what, t) in [
        ("k2 of the refused set", token_with("k2", Algorithm::HS256)),
        (
            "the second k1",
            token_signed("k1", Algorithm::HS256, &attacker),
        ),
    ] {
        assert_eq!(
            refused_status(d.addr, &format!("/ws?token={t}"), &[]).await,
            401,
            "{what}"
        );
    }
    assert!(accepted(d.addr, &token_with("k1", Algorithm::HS256)).await);
    d.stop().await;
}

#[tokio::test]
async fn a_new_kid_gets_in_at_its_first_try_and_random_kids_cannot_force_fetches() {
    let db = TestDb::new().await;
    let doc = Arc::new(Mutex::new(set(&[jwk("k1", "HS256")])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks = counted_jwks(doc.clone(), None, fetches.clone()).await;
    let url = format!("http://{jwks}/jwks");
    let tweak = |c: &mut citapulse::config::Config| {
        c.auth.jwks_url = Some(url.clone());
        c.auth.jwks_allow_hmac = true;
        // No periodic refresh during the test: only unknown kids fetch.
        c.auth.jwks_refresh_secs = 3600;
    };
    let a = Daemon::start(&db.url, tweak).await;
    let b = Daemon::start(&db.url, tweak).await;
    let k1 = token_with("k1", Algorithm::HS256);
    let mut open = WsClient::connect(b.addr, &k1).await;

    // The issuer publishes k2 and signs with it at once.
    *doc.lock().unwrap() = set(&[jwk("k1", "HS256"), jwk("k2", "HS256")]);
    let k2 = token_with("k2", Algorithm::HS256);
    assert!(accepted(a.addr, &k2).await, "a handshake with a new kid");
    open.send(json!({"type": "auth", "data": {"token": k2}}))
        .await;
    let reply = open
        .expect(|m| m["type"] == "authenticated" || m["type"] == "error")
        .await;
    assert_eq!(
        reply["type"], "authenticated",
        "a refresh with a new kid: {reply}"
    );

    // Random kids, at once and one after another: all refused, and the daemon fetches
    // at most once per 10 s for them.
    let started = std::time::Instant::now();
    let before = fetches.load(Ordering::SeqCst);
    let random = || {
        let kid = format!("random-{:016x}", fastrand::u64(..));
        token_signed(&kid, Algorithm::HS256, &secret(&kid))
    };
    let storm: Vec<_> = (0..40)
        .map(|_| {
            let t = random();
            let addr = a.addr;
            tokio::spawn(async move { refused_status(addr, &format!("/ws?token={t}"), &[]).await })
        })
        .collect();
    for s in storm {
        assert_eq!(s.await.unwrap(), 401);
    }
    for _ in 0..20 {
        let t = random();
        assert_eq!(
            refused_status(a.addr, &format!("/ws?token={t}"), &[]).await,
            401
        );
    }
    // Known keys are not held up by the storm.
    assert!(accepted(a.addr, &k1).await);
    let extra = fetches.load(Ordering::SeqCst) - before;
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        extra <= allowed,
        "{extra} fetches for random kids, at most {allowed}"
    );
    open.close().await;
    a.stop().await;
    b.stop().await;
}
