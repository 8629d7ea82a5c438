//! JWKS and key rotation (DESIGN.md §10): keys by `kid` from `auth.jwks_url` (a local
//! HTTP endpoint serving a rotating set) and `auth.jwks_file` with SIGHUP; algorithms
//! stay pinned; a removed key is refused at the next handshake and `auth` refresh while
//! open sockets stay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
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
    json!({"kty": "oct", "kid": kid, "alg": alg,
           "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret(kid))})
}

fn set(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// An HS256 token of `sub` in t1 signed with `kid`'s secret.
fn token_with(kid: &str, alg: Algorithm) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "u1", "negocio_id": "t1", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret(kid))).unwrap()
}

/// Serves whatever `doc` holds at any path, one response per connection.
async fn jwks_server(doc: Arc<Mutex<String>>) -> SocketAddr {
    serve_jwks(doc, None).await
}

/// The same over TLS with `tls`'s certificate.
async fn serve_jwks(doc: Arc<Mutex<String>>, tls: Option<Arc<ServerConfig>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let body = doc.lock().unwrap().clone();
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
