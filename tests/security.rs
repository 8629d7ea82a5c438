//! Issue 4, "secure by default": every protection against hostile input, exercised with
//! real sockets against the real daemon. Each test fails if its protection is removed.
//!
//! `tests/keys/` holds test-only RS256/ES256 key pairs made with `openssl genpkey`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use citapulse::config::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Environment variables, or HTTP headers: name and value.
type Env<'a> = Vec<(&'a str, &'a str)>;
type Headers<'a> = Env<'a>;

// ---------------------------------------------------------------------------------------
// Tokens.

fn now() -> u64 {
    citapulse::clock::unix_now()
}

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn key_bytes(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap()
}

/// Valid claims for tenant t1, with `changes` merged in (a `null` removes the claim).
fn claims(changes: Value) -> Value {
    let mut c = json!({
        "sub": "user-t1",
        "negocio_id": "t1",
        "role": "staff",
        "iat": now(),
        "exp": now() + 3600,
    });
    if let (Some(map), Some(changes)) = (c.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            if v.is_null() {
                map.remove(k);
            } else {
                map.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

/// Signed with the daemon's own HMAC secret.
fn hs(alg: Algorithm, claims: &Value) -> String {
    sign(alg, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&key_bytes("rs256_private.pem")).unwrap();
    sign(Algorithm::RS256, &key, claims)
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&key_bytes("es256_private.pem")).unwrap();
    sign(Algorithm::ES256, &key, claims)
}

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// `{"alg":"none"}` with an empty signature: the classic forgery.
fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

// ---------------------------------------------------------------------------------------
// A raw WebSocket client: the handshake and frames written by hand on a TcpStream, so a
// test can stop reading, flood, or never answer pings.

/// What a hand-written handshake got back.
struct Handshake {
    status: u16,
    head: String,
    body: String,
    ws: Option<RawWs>,
}

async fn handshake(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Handshake {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("a handshake answer within the wait")
            .unwrap();
        assert!(n > 0, "connection closed before the handshake answer");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let rest = buf.split_off(head_end);
    if status == 101 {
        return Handshake {
            status,
            head,
            body: String::new(),
            ws: Some(RawWs { s, buf: rest }),
        };
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = rest;
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Handshake {
        status,
        head,
        body: String::from_utf8_lossy(&body).to_string(),
        ws: None,
    }
}

/// Status and JSON body of a handshake that must be refused.
async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let h = handshake(addr, path, headers).await;
    assert_ne!(h.status, 101, "handshake unexpectedly accepted: {path}");
    let body = serde_json::from_str(&h.body).unwrap_or(Value::Null);
    (h.status, body)
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// One frame from the server.
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn json(&self) -> Option<Value> {
        (self.opcode == OP_TEXT)
            .then(|| serde_json::from_slice(&self.payload).ok())
            .flatten()
    }

    fn close_code(&self) -> Option<u16> {
        match self.payload.as_slice() {
            [a, b, ..] if self.opcode == OP_CLOSE => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }
}

/// A client frame (clients must mask).
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

fn parse_frame(b: &[u8]) -> Option<(Frame, usize)> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let mut len = usize::from(b1 & 0x7f);
    let mut at = 2;
    if len == 126 {
        len = usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?));
        at = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize;
        at = 10;
    }
    assert_eq!(b1 & 0x80, 0, "server frames are never masked");
    let payload = b.get(at..at + len)?.to_vec();
    Some((
        Frame {
            opcode: b0 & 0x0f,
            payload,
        },
        at + len,
    ))
}

struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades with `?token=`; panics unless the server answers 101.
    async fn connect(addr: SocketAddr, token: &str) -> Self {
        let h = handshake(addr, &format!("/ws?token={token}"), &[]).await;
        assert_eq!(h.status, 101, "{}{}", h.head, h.body);
        h.ws.unwrap()
    }

    /// Writes bytes; false once the server has gone.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).await.is_ok()
    }

    async fn send_text(&mut self, text: &str) -> bool {
        self.write(&client_frame(true, OP_TEXT, text.as_bytes()))
            .await
    }

    /// The next frame, or `None` once the server closed the TCP connection; panics if
    /// nothing at all happens within `wait`.
    async fn frame_within(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                .await
                .expect("the server neither sent a frame nor closed within the wait");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn frame(&mut self) -> Option<Frame> {
        self.frame_within(WAIT).await
    }

    /// Reads until the TCP connection ends; returns the close code if a close frame came.
    async fn until_closed(&mut self, wait: Duration) -> (Vec<Frame>, Option<u16>) {
        let mut frames = Vec::new();
        let mut code = None;
        while let Some(f) = self.frame_within(wait).await {
            if f.opcode == OP_CLOSE {
                code = f.close_code();
            }
            frames.push(f);
        }
        (frames, code)
    }

    /// Reads until a close frame (returned) or the end of the connection (`None`).
    async fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.frame().await {
            if f.opcode == OP_CLOSE {
                return f.close_code();
            }
        }
        None
    }
}

/// Reads the read half of a [`RawWs`] split for a writer task until a close frame (its
/// code) or the end of the connection (`None`), starting with the bytes already in
/// `buf`. Pongs and errors keep coming while a flood lasts: one deadline for the close,
/// past which it panics with `late`.
async fn close_code_under_flood(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    mut buf: Vec<u8>,
    late: &str,
) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((f, used)) = parse_frame(&buf) {
            buf.drain(..used);
            if f.opcode == OP_CLOSE {
                return f.close_code();
            }
            continue;
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk))
            .await
            .expect(late)
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Authentication at the handshake.

#[tokio::test]
async fn forged_and_unacceptable_tokens_get_401_before_any_upgrade() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;

    // The control: the same helper with a good token upgrades.
    let ok = handshake(
        d.addr,
        &format!("/ws?token={}", hs(Algorithm::HS256, &claims(json!({})))),
        &[],
    )
    .await;
    assert_eq!(ok.status, 101, "{}", ok.body);

    let other_key = EncodingKey::from_secret(b"not-the-daemon-secret-0123456789");
    let good = hs(Algorithm::HS256, &claims(json!({})));
    let [h, _, s]: [&str; 3] = good.split('.').collect::<Vec<_>>().try_into().unwrap();
    let admin_payload = b64url(claims(json!({"role": "admin"})).to_string().as_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned(&claims(json!({}))), "token_invalid"),
        (
            "alg none, signature kept",
            format!(
                "{}.{}.{s}",
                b64url(br#"{"alg":"none"}"#),
                b64url(claims(json!({})).to_string().as_bytes())
            ),
            "token_invalid",
        ),
        (
            "HS384 when only HS256 is configured",
            hs(Algorithm::HS384, &claims(json!({}))),
            "token_invalid",
        ),
        (
            "HS512 when only HS256 is configured",
            hs(Algorithm::HS512, &claims(json!({}))),
            "token_invalid",
        ),
        (
            "RS256 when only HS256 is configured",
            rs256(&claims(json!({}))),
            "token_invalid",
        ),
        (
            "wrong signature",
            sign(Algorithm::HS256, &other_key, &claims(json!({}))),
            "token_invalid",
        ),
        (
            "payload swapped under a valid signature",
            format!("{h}.{admin_payload}.{s}"),
            "token_invalid",
        ),
        (
            "no signature",
            format!("{h}.{admin_payload}."),
            "token_invalid",
        ),
        (
            "missing exp",
            hs(Algorithm::HS256, &claims(json!({"exp": null}))),
            "token_invalid",
        ),
        (
            "exp as text",
            hs(Algorithm::HS256, &claims(json!({"exp": "9999999999"}))),
            "token_invalid",
        ),
        (
            "past exp",
            hs(Algorithm::HS256, &claims(json!({"exp": now() - 120}))),
            "token_expired",
        ),
        (
            "future nbf",
            hs(Algorithm::HS256, &claims(json!({"nbf": now() + 600}))),
            "token_invalid",
        ),
        (
            "missing sub",
            hs(Algorithm::HS256, &claims(json!({"sub": null}))),
            "token_invalid",
        ),
        ("garbage", "not.a.jwt".into(), "token_invalid"),
        ("oversized", "a".repeat(9000), "token_invalid"),
        ("empty", String::new(), "token_missing"),
    ];
    for (what, token, reason) in &cases {
        let (status, body) = refused(d.addr, &format!("/ws?token={token}"), &[]).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(body["error"], *reason, "{what}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty() && m.len() < 100),
            "{what}: a short reason: {body}"
        );
    }
    // No token anywhere, and the 401 tells the client how to authenticate.
    let h = handshake(d.addr, "/ws", &[]).await;
    assert_eq!(h.status, 401);
    assert!(
        h.head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        h.head
    );
    let refused_count = d.metric("citapulse_handshakes_refused_total").await;
    assert!(refused_count >= cases.len() as f64, "{refused_count}");
    assert_eq!(
        d.metric("citapulse_connections").await,
        1.0,
        "only the control upgraded"
    );
    d.stop().await;
}

#[tokio::test]
async fn every_token_carrier_is_verified() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let good = tenant_token("t1");
    let forged = unsigned(&claims(json!({})));

    for (what, token, want) in [("good", &good, 101), ("forged", &forged, 401)] {
        let bearer = format!("Bearer {token}");
        let h = handshake(d.addr, "/ws", &[("Authorization", &bearer)]).await;
        assert_eq!(h.status, want, "Authorization, {what}");
        let protocols = format!("citapulse, {token}");
        let h = handshake(d.addr, "/ws", &[("Sec-WebSocket-Protocol", &protocols)]).await;
        assert_eq!(h.status, want, "subprotocol, {what}");
        if want == 101 {
            let head = h.head.to_ascii_lowercase();
            assert!(
                head.contains("sec-websocket-protocol: citapulse\r\n"),
                "{head}"
            );
            assert!(
                !h.head.contains(token.as_str()),
                "the token is never echoed"
            );
        }
    }
    // Percent-encoded query values decode ('.' as %2E), and a browser that offers the
    // subprotocol while sending the token in the query gets the echo it requires.
    let encoded = good.replace('.', "%2E");
    let mut req = format!("ws://{}/ws?token={encoded}", d.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "citapulse".parse().unwrap());
    let (_ws, res) = tokio_tungstenite::connect_async(req)
        .await
        .expect("offered subprotocol with a query token");
    assert_eq!(
        res.headers().get("sec-websocket-protocol").unwrap(),
        "citapulse"
    );
    // A malformed escape is not a crash, just a bad token.
    let (status, _) = refused(d.addr, "/ws?token=%E2%82%%zz%", &[]).await;
    assert_eq!(status, 401);
    d.stop().await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.issuer = Some("https://auth.example".into());
        c.auth.audience = Some("citapulse".into());
    })
    .await;
    let good = json!({"iss": "https://auth.example", "aud": "citapulse"});
    let t = hs(Algorithm::HS256, &claims(good.clone()));
    assert_eq!(
        handshake(d.addr, &format!("/ws?token={t}"), &[])
            .await
            .status,
        101
    );
    for (what, change) in [
        ("wrong iss", json!({"iss": "https://evil.example"})),
        ("missing iss", json!({"iss": null})),
        ("wrong aud", json!({"aud": "another-service"})),
        ("missing aud", json!({"aud": null})),
    ] {
        let mut c = claims(good.clone());
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        let (status, body) = refused(
            d.addr,
            &format!("/ws?token={}", hs(Algorithm::HS256, &c)),
            &[],
        )
        .await;
        assert_eq!(status, 401, "{what}: {body}");
    }
    d.stop().await;
}

#[tokio::test]
async fn rs256_and_es256_verify_with_a_public_key_and_refuse_hmac() {
    let db = TestDb::new().await;
    let rs = Daemon::start(&db.url, |c| {
        c.auth.jwt_secret = None;
        c.auth.algorithms = vec!["RS256".into()];
        c.auth.public_key_file = Some(key_path("rs256_public.pem"));
    })
    .await;
    let es = Daemon::start(&db.url, |c| {
        c.auth.jwt_secret = None;
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.public_key_file = Some(key_path("es256_public.pem"));
    })
    .await;

    let mut c = WsClient::connect(rs.addr, &rs256(&claims(json!({})))).await;
    c.subscribe("t1", None).await;
    let mut c = WsClient::connect(es.addr, &es256(&claims(json!({})))).await;
    c.subscribe("t1", None).await;

    // Key confusion: HMAC keyed with the public key the server holds.
    let rsa_pub = EncodingKey::from_secret(&key_bytes("rs256_public.pem"));
    let ec_pub = EncodingKey::from_secret(&key_bytes("es256_public.pem"));
    let rs_private = EncodingKey::from_rsa_pem(&key_bytes("rs256_private.pem")).unwrap();
    let refused_by_rs = [
        (
            "HS256 with the test secret",
            hs(Algorithm::HS256, &claims(json!({}))),
        ),
        (
            "HS256 keyed with the public key",
            sign(Algorithm::HS256, &rsa_pub, &claims(json!({}))),
        ),
        (
            "RS512 with the right key",
            sign(Algorithm::RS512, &rs_private, &claims(json!({}))),
        ),
        ("ES256", es256(&claims(json!({})))),
        ("alg none", unsigned(&claims(json!({})))),
        ("RS256 expired", rs256(&claims(json!({"exp": now() - 120})))),
    ];
    for (what, t) in &refused_by_rs {
        let (status, body) = refused(rs.addr, &format!("/ws?token={t}"), &[]).await;
        assert_eq!(status, 401, "RS256 daemon, {what}: {body}");
    }
    let refused_by_es = [
        (
            "HS256 with the test secret",
            hs(Algorithm::HS256, &claims(json!({}))),
        ),
        (
            "HS256 keyed with the public key",
            sign(Algorithm::HS256, &ec_pub, &claims(json!({}))),
        ),
        ("RS256", rs256(&claims(json!({})))),
    ];
    for (what, t) in &refused_by_es {
        let (status, body) = refused(es.addr, &format!("/ws?token={t}"), &[]).await;
        assert_eq!(status, 401, "ES256 daemon, {what}: {body}");
    }
    rs.stop().await;
    es.stop().await;
}

/// Runs the binary with a clean environment in an empty directory (no config.toml).
fn run_binary(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Command {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "citapulse-sec-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_citapulse"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn startup_without_usable_key_material_is_refused_naming_the_key() {
    let rsa_pub = key_path("rs256_public.pem");
    let rsa_pub = rsa_pub.to_str().unwrap();
    let db = [
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("CITAPULSE_LISTEN", "127.0.0.1:0"),
    ];
    let cases: Vec<(&str, Env, &str)> = vec![
        ("no secret at all", vec![], "auth.jwt_secret"),
        (
            "a short secret",
            vec![("JWT_SECRET", "tiny-secret")],
            "auth.jwt_secret",
        ),
        (
            "RS256 without a key file",
            vec![("CITAPULSE_AUTH__ALGORITHMS", "[\"RS256\"]")],
            "auth.public_key_file",
        ),
        (
            "RS256 with a missing key file",
            vec![
                ("CITAPULSE_AUTH__ALGORITHMS", "[\"RS256\"]"),
                ("CITAPULSE_AUTH__PUBLIC_KEY_FILE", "/nonexistent/key.pem"),
            ],
            "auth.public_key_file",
        ),
        (
            "ES256 with an RSA key",
            vec![
                ("CITAPULSE_AUTH__ALGORITHMS", "[\"ES256\"]"),
                ("CITAPULSE_AUTH__PUBLIC_KEY_FILE", rsa_pub),
            ],
            "auth.public_key_file",
        ),
        (
            "alg none in the config",
            vec![
                ("JWT_SECRET", SECRET),
                ("CITAPULSE_AUTH__ALGORITHMS", "[\"none\"]"),
            ],
            "auth.algorithms",
        ),
        (
            "a short secret next to a JWKS",
            vec![
                ("JWT_SECRET", "tiny-secret"),
                ("CITAPULSE_AUTH__JWKS_FILE", "/nonexistent/jwks.json"),
            ],
            "auth.jwt_secret",
        ),
        (
            "jwks_allow_hmac not a boolean",
            vec![
                ("JWT_SECRET", SECRET),
                ("CITAPULSE_AUTH__JWKS_URL", "https://idp.invalid/jwks"),
                ("CITAPULSE_AUTH__JWKS_ALLOW_HMAC", "maybe"),
            ],
            "auth.jwks_allow_hmac",
        ),
        (
            "jwks_allow_hmac without a jwks_url",
            vec![
                ("JWT_SECRET", SECRET),
                ("CITAPULSE_AUTH__JWKS_ALLOW_HMAC", "true"),
            ],
            "auth.jwks_allow_hmac",
        ),
    ];
    for (what, env, key) in cases {
        let env: Vec<(&str, &str)> = db.iter().copied().chain(env).collect();
        let out = run_binary(&["serve"], &env, Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        // Figment names keys from the environment in upper case.
        assert!(
            stderr.to_lowercase().contains(key),
            "{what}: stderr names {key}: {stderr}"
        );
        assert!(
            !stderr.contains("tiny-secret"),
            "{what}: the secret is not printed: {stderr}"
        );
    }
}

#[tokio::test]
async fn logs_never_contain_a_token() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = std::env::temp_dir().join(format!(
        "citapulse-sec-log-{}-{}.txt",
        std::process::id(),
        free_port()
    ));
    let log = std::fs::File::create(&log_path).unwrap();
    let notify_secret = "notify-secret-for-the-log-test-0123";
    let child = run_binary(
        &["serve"],
        &[
            ("DATABASE_URL", &db.url),
            ("JWT_SECRET", SECRET),
            ("CITAPULSE_LISTEN", &addr.to_string()),
            ("CITAPULSE_AUTH__NOTIFY_SECRET", notify_secret),
            ("RUST_LOG", "debug"),
        ],
        Stdio::from(log),
    )
    .spawn()
    .unwrap();
    wait_until(|| async {
        TcpStream::connect(addr).await.is_ok() && http_get(addr, "/health", &[]).await.0 == 200
    })
    .await;

    let query = tenant_token("t1");
    let refreshed = token_with_ttl("user-t1", Some("t1"), Some("staff"), 7200);
    let header = token("user-h", Some("t1"), Some("staff"));
    let subprotocol = token("user-p", Some("t1"), Some("staff"));
    let admin = token("root", None, Some("admin"));
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"forger-secret-0123456789"),
        &claims(json!({})),
    );
    let expired = hs(Algorithm::HS256, &claims(json!({"exp": now() - 120})));
    let tokens = [
        &query,
        &refreshed,
        &header,
        &subprotocol,
        &admin,
        &forged,
        &expired,
    ];

    let mut c = WsClient::connect(addr, &query).await;
    c.subscribe("t1", None).await;
    c.send(json!({"type": "auth", "data": {"token": refreshed}}))
        .await;
    c.expect_type("authenticated").await;
    c.send(json!({"type": "auth", "data": {"token": forged}}))
        .await;
    assert_eq!(c.expect_type("error").await["data"]["code"], "unauthorized");
    c.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t2"}}))
        .await;
    assert_eq!(c.expect_type("error").await["data"]["code"], "forbidden");
    let bearer = format!("Bearer {header}");
    assert_eq!(
        handshake(addr, "/ws", &[("Authorization", &bearer)])
            .await
            .status,
        101
    );
    let protocols = format!("citapulse, {subprotocol}");
    assert_eq!(
        handshake(addr, "/ws", &[("Sec-WebSocket-Protocol", &protocols)])
            .await
            .status,
        101
    );
    assert_eq!(
        refused(addr, &format!("/ws?token={forged}"), &[]).await.0,
        401
    );
    assert_eq!(
        refused(
            addr,
            &format!("/ws?token={expired}"),
            &[("Authorization", &bearer)]
        )
        .await
        .0,
        401
    );
    let admin_bearer = format!("Bearer {admin}");
    assert_eq!(
        http_get(addr, "/stats", &[("Authorization", &admin_bearer)])
            .await
            .0,
        200
    );
    let forged_bearer = format!("Bearer {forged}");
    assert_eq!(
        http_get(addr, "/stats", &[("Authorization", &forged_bearer)])
            .await
            .0,
        401
    );
    let body = r#"{"negocio_id":"t1","action":"created"}"#;
    let notified = http(
        addr,
        "POST",
        "/notify/cita",
        &[("X-Citapulse-Secret", notify_secret)],
        body,
    )
    .await;
    assert_eq!(notified.0, 202);
    c.close().await;

    // Every line about the sockets above is written before the daemon says goodbye.
    let text = stop_and_read_log(child, &log_path).await;
    assert!(
        text.contains("handshake refused"),
        "refusals are logged:\n{text}"
    );
    assert!(
        text.contains("connection opened"),
        "connections are logged:\n{text}"
    );
    for t in tokens {
        for (i, part) in t.split('.').enumerate() {
            // Headers repeat across tokens and carry nothing secret; payloads and
            // signatures are what a log reader could replay.
            if i > 0 && part.len() > 8 {
                assert!(
                    !text.contains(part),
                    "a token part reached the log:\n{text}"
                );
            }
        }
        assert!(!text.contains(t.as_str()));
    }
    assert!(
        !text.contains(SECRET) && !text.contains(notify_secret),
        "a secret reached the log"
    );
}

// ---------------------------------------------------------------------------------------
// Token lifetime on an open socket.

#[tokio::test]
async fn an_expiring_token_closes_the_socket_with_4001() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c =
        WsClient::connect(d.addr, &token_with_ttl("u1", Some("t1"), Some("staff"), 2)).await;
    c.subscribe("t1", None).await;
    loop {
        match c
            .next_frame()
            .await
            .expect("a close frame, not a dropped connection")
        {
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 4001);
                assert_eq!(f.reason.as_str(), "token expired");
                break;
            }
            Message::Close(None) => panic!("close without a code"),
            _ => {}
        }
    }
    d.stop().await;
}

#[tokio::test]
async fn a_refreshed_token_keeps_the_socket_open_past_the_first_expiry() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut refreshed =
        WsClient::connect(d.addr, &token_with_ttl("u1", Some("t1"), Some("staff"), 2)).await;
    // The witness expires at least two seconds after the first token: its 4001 proves
    // the first expiry has passed, whatever the machine's speed.
    let mut witness =
        WsClient::connect(d.addr, &token_with_ttl("u2", Some("t1"), Some("staff"), 4)).await;
    refreshed
        .send(json!({"type": "auth", "data": {"token": token_with_ttl("u1", Some("t1"), Some("staff"), 3600)}}))
        .await;
    let ack = refreshed.expect_type("authenticated").await;
    assert!(
        ack["data"]["expires_at"].as_u64().unwrap() > now() + 3000,
        "{ack}"
    );
    assert_eq!(witness.close_code().await, Some(4001));
    refreshed.send(json!({"type": "ping"})).await;
    refreshed.expect_type("pong").await;
    refreshed.subscribe("t1", None).await;
    d.stop().await;
}

#[tokio::test]
async fn a_refresh_for_another_identity_is_refused() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c =
        WsClient::connect(d.addr, &token_with_ttl("u1", Some("t1"), Some("staff"), 3)).await;
    let attempts = [
        (
            "another user",
            token_with_ttl("u2", Some("t1"), Some("staff"), 3600),
            "forbidden",
        ),
        (
            "another tenant",
            token_with_ttl("u1", Some("t2"), Some("staff"), 3600),
            "forbidden",
        ),
        (
            "no tenant, super role",
            token_with_ttl("u1", None, Some("admin"), 3600),
            "forbidden",
        ),
        (
            "forged",
            unsigned(&claims(json!({"sub": "u1"}))),
            "unauthorized",
        ),
        (
            "expired",
            hs(
                Algorithm::HS256,
                &claims(json!({"sub": "u1", "exp": now() - 120})),
            ),
            "unauthorized",
        ),
    ];
    for (what, t, code) in attempts {
        c.send(json!({"type": "auth", "data": {"token": t}})).await;
        let err = c.expect_type("error").await;
        assert_eq!(err["data"]["code"], code, "{what}: {err}");
    }
    // None of them extended the session.
    assert_eq!(c.close_code().await, Some(4001));
    d.stop().await;
}

#[tokio::test]
async fn a_refresh_that_drops_a_super_role_drops_foreign_channels_and_recounts() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let admin_bearer = format!("Bearer {}", token("observer", None, Some("superadmin")));
    let stats = || async {
        let (status, body) = http_get(d.addr, "/stats", &[("Authorization", &admin_bearer)]).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let mut c = WsClient::connect(d.addr, &token("root", Some("t1"), Some("admin"))).await;
    c.subscribe("t1", None).await;
    c.subscribe("t2", None).await;
    assert_eq!(stats().await["tenants"], json!({"t1": {"admin": 1}}));

    c.send(json!({"type": "auth", "data": {"token": token_with_ttl("root", Some("t1"), Some("staff"), 7200)}}))
        .await;
    let err = c.expect_type("error").await;
    assert_eq!(err["data"]["code"], "forbidden", "{err}");
    assert_eq!(err["data"]["channel"], "estadisticas:t2", "{err}");
    c.expect_type("authenticated").await;
    assert_eq!(
        d.metric("citapulse_subscriptions").await,
        1.0,
        "t2 was dropped, t1 kept"
    );
    assert_eq!(stats().await["tenants"], json!({"t1": {"staff": 1}}));

    db.insert_cita("t2", "pendiente").await;
    db.insert_cita("t1", "pendiente").await;
    let ev = c.expect(|m| m.get("id").is_some()).await;
    assert_eq!(
        ev["channel"], "estadisticas:t1",
        "no t2 event after the downgrade: {ev}"
    );

    c.close().await;
    wait_until(|| async { stats().await["connections"] == json!(0) }).await;
    assert_eq!(
        stats().await["tenants"],
        json!({}),
        "no count left behind under the old role"
    );
    d.stop().await;
}

// ---------------------------------------------------------------------------------------
// Authorization.

#[tokio::test]
async fn channel_names_are_validated_and_tenants_enforced() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    let long = format!("estadisticas:{}", "a".repeat(65));
    let bad = [
        "stats:t1",
        "estadisticast1",
        "ESTADISTICAS:t1",
        "estadisticas:",
        long.as_str(),
        "estadisticas:négocio",
        "estadisticas:t1\u{0}",
        "estadisticas:*",
        "estadisticas:../t1",
        "estadisticas:t1/../t2",
        "estadisticas:t1 ",
        "estadisticas:t1:x",
        "",
    ];
    for channel in bad {
        c.send(json!({"type": "subscribe", "data": {"channel": channel}}))
            .await;
        let m = c
            .expect(|m| m["type"] == "error" || m["type"] == "subscribed")
            .await;
        assert_eq!(m["data"]["code"], "bad_request", "{channel:?}: {m}");
        c.send(json!({"type": "unsubscribe", "data": {"channel": channel}}))
            .await;
        let m = c
            .expect(|m| m["type"] == "error" || m["type"] == "unsubscribed")
            .await;
        assert_eq!(
            m["data"]["code"], "bad_request",
            "unsubscribe {channel:?}: {m}"
        );
    }
    for other in ["t2", "t10", "T1", "t1.", "t1_"] {
        c.send(json!({"type": "subscribe", "data": {"channel": format!("estadisticas:{other}")}}))
            .await;
        let m = c
            .expect(|m| m["type"] == "error" || m["type"] == "subscribed")
            .await;
        assert_eq!(m["data"]["code"], "forbidden", "{other}: {m}");
    }
    assert_eq!(
        d.metric("citapulse_subscriptions").await,
        0.0,
        "nothing was subscribed"
    );
    c.subscribe("t1", None).await;

    // A super role reads any tenant, but only through a well-formed name.
    let mut root = WsClient::connect(d.addr, &token("root", None, Some("admin"))).await;
    root.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:*"}}))
        .await;
    assert_eq!(
        root.expect_type("error").await["data"]["code"],
        "bad_request"
    );
    root.subscribe("t2", None).await;
    // A token without a tenant claim and without a super role reads nothing.
    let mut nobody = WsClient::connect(d.addr, &token("nobody", None, Some("staff"))).await;
    nobody
        .send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t1"}}))
        .await;
    assert_eq!(
        nobody.expect_type("error").await["data"]["code"],
        "forbidden"
    );
    // The longest tenant id is accepted.
    let longest = "b".repeat(64);
    let mut edge = WsClient::connect(d.addr, &tenant_token(&longest)).await;
    edge.subscribe(&longest, None).await;
    d.stop().await;
}

#[tokio::test]
async fn subscriptions_per_connection_are_capped() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.subscriptions_per_connection = 2).await;
    let mut root = WsClient::connect(d.addr, &token("root", None, Some("admin"))).await;
    root.subscribe("t1", None).await;
    root.subscribe("t2", None).await;
    // Subscribing again to a channel it has costs nothing.
    root.subscribe("t2", None).await;
    root.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t3"}}))
        .await;
    let m = root
        .expect(|m| m["type"] == "error" || m["type"] == "subscribed")
        .await;
    assert_eq!(m["data"]["code"], "too_many_subscriptions", "{m}");
    assert_eq!(d.metric("citapulse_subscriptions").await, 2.0);
    d.stop().await;
}

#[tokio::test]
async fn stats_endpoint_needs_a_super_role() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let _c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    let cases = [
        ("no token", None, 401),
        ("garbage", Some("Bearer not.a.token".to_string()), 401),
        (
            "forged super",
            Some(format!(
                "Bearer {}",
                unsigned(&claims(json!({"role": "admin"})))
            )),
            401,
        ),
        (
            "expired super",
            Some(format!(
                "Bearer {}",
                hs(
                    Algorithm::HS256,
                    &claims(json!({"role": "admin", "exp": now() - 120}))
                )
            )),
            401,
        ),
        (
            "tenant user",
            Some(format!("Bearer {}", tenant_token("t1"))),
            403,
        ),
        (
            "admin",
            Some(format!("Bearer {}", token("root", None, Some("admin")))),
            200,
        ),
        (
            "superadmin",
            Some(format!(
                "Bearer {}",
                token("root", Some("t9"), Some("superadmin"))
            )),
            200,
        ),
    ];
    for (what, auth, want) in cases {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, body) = http_get(d.addr, "/stats", &headers).await;
        assert_eq!(status, want, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if want == 200 {
            assert_eq!(v["tenants"], json!({"t1": {"staff": 1}}), "{v}");
        } else {
            assert!(
                v.get("tenants").is_none(),
                "{what}: no data in a refusal: {v}"
            );
        }
    }
    // The query string is not a way in for this endpoint.
    let admin = token("root", None, Some("admin"));
    assert_eq!(
        http_get(d.addr, &format!("/stats?token={admin}"), &[])
            .await
            .0,
        401
    );
    d.stop().await;
}

#[tokio::test]
async fn notify_endpoint_needs_the_shared_secret_or_a_super_role() {
    let db = TestDb::new().await;
    let secret = "notify-secret-0123456789-abcdef";
    let d = Daemon::start(&db.url, |c| {
        c.auth.notify_secret = Some(Secret::new(secret))
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    let body = r#"{"negocio_id":"t1","action":"created"}"#;
    let admin = format!("Bearer {}", token("root", None, Some("admin")));
    let staff = format!("Bearer {}", tenant_token("t1"));
    let forged = format!("Bearer {}", unsigned(&claims(json!({"role": "admin"}))));
    let cases: [(&str, Headers, u16); 7] = [
        ("nothing", vec![], 401),
        (
            "wrong secret",
            vec![("X-Citapulse-Secret", "notify-secret-0123456789-abcdeX")],
            401,
        ),
        (
            "secret prefix",
            vec![("X-Citapulse-Secret", "notify-secret")],
            401,
        ),
        ("forged super token", vec![("Authorization", &forged)], 401),
        ("tenant token", vec![("Authorization", &staff)], 403),
        ("shared secret", vec![("X-Citapulse-Secret", secret)], 202),
        ("super token", vec![("Authorization", &admin)], 202),
    ];
    for (what, headers, want) in cases {
        let (status, resp) = http(d.addr, "POST", "/notify/cita", &headers, body).await;
        assert_eq!(status, want, "{what}: {resp}");
        if want == 202 {
            // Accepted means the tenant was marked dirty: fresh statistics follow.
            c.expect_type("stats").await;
        }
    }
    let bad_tenant = r#"{"negocio_id":"../t1","action":"created"}"#;
    let (status, _) = http(
        d.addr,
        "POST",
        "/notify/cita",
        &[("X-Citapulse-Secret", secret)],
        bad_tenant,
    )
    .await;
    assert_eq!(status, 400);
    d.stop().await;

    // An empty configured secret must not turn an empty header into a key.
    let d = Daemon::start(&db.url, |c| c.auth.notify_secret = Some(Secret::new(""))).await;
    let (status, _) = http(
        d.addr,
        "POST",
        "/notify/cita",
        &[("X-Citapulse-Secret", "")],
        body,
    )
    .await;
    assert_eq!(status, 401);
    d.stop().await;
}

// ---------------------------------------------------------------------------------------
// Limits.

#[tokio::test]
async fn an_oversize_frame_or_message_closes_with_1009() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.max_frame_bytes = 1024).await;

    // Just under the limit: an ordinary bad request, the socket stays.
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.send_raw(Message::Text("x".repeat(1000).into())).await;
    assert_eq!(c.expect_type("error").await["data"]["code"], "bad_request");
    // Over it: one frame.
    c.send_raw(Message::Text(
        format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(2000)).into(),
    ))
    .await;
    assert_eq!(c.close_code().await, Some(1009));

    // Over it in fragments each below the limit.
    let mut raw = RawWs::connect(d.addr, &tenant_token("t1")).await;
    let part = vec![b' '; 600];
    assert!(raw.write(&client_frame(false, OP_TEXT, &part)).await);
    assert!(raw.write(&client_frame(false, OP_CONT, &part)).await);
    let _ = raw.write(&client_frame(true, OP_CONT, &part)).await;
    assert_eq!(raw.close_code().await, Some(1009));
    d.stop().await;

    // The default limit (64 KiB) is on too.
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.send_raw(Message::Text("y".repeat(65 * 1024).into()))
        .await;
    assert_eq!(c.close_code().await, Some(1009));
    d.stop().await;
}

#[tokio::test]
async fn a_flood_gets_rate_limited_then_closed_with_1008() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.messages_per_sec = 10).await;
    let mut raw = RawWs::connect(d.addr, &tenant_token("t1")).await;
    let ping = client_frame(true, OP_TEXT, br#"{"type":"ping"}"#);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 300)
        .collect();
    let _ = raw.write(&burst).await;
    let (frames, code) = raw.until_closed(WAIT).await;
    let kinds: Vec<Value> = frames.iter().filter_map(Frame::json).collect();
    let pongs = kinds.iter().filter(|m| m["type"] == "pong").count();
    let limited = kinds
        .iter()
        .filter(|m| m["data"]["code"] == "rate_limited")
        .count();
    assert!(
        (1..100).contains(&pongs),
        "the bucket lets about 10 through: {pongs}"
    );
    assert!(
        limited >= 1,
        "excess messages are answered with rate_limited"
    );

    assert_eq!(code, Some(1008));
    d.stop().await;
}

#[tokio::test]
async fn a_paced_flood_that_wins_tokens_back_is_closed_too() {
    // Five times the allowed rate, evenly spaced: every fifth message finds a token.
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.messages_per_sec = 10).await;
    let mut raw = RawWs::connect(d.addr, &tenant_token("t1")).await;
    let ping = client_frame(true, OP_TEXT, br#"{"type":"ping"}"#);
    let (mut rd, mut wr) = raw.s.into_split();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if wr.write_all(&ping).await.is_err() {
                break;
            }
        }
    });
    let buf = std::mem::take(&mut raw.buf);
    let code =
        close_code_under_flood(&mut rd, buf, "sustained abuse is closed within the wait").await;
    writer.abort();
    assert_eq!(code, Some(1008));
    d.stop().await;
}

#[tokio::test]
async fn connections_per_ip_beyond_the_limit_get_429() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.connections_per_ip = 2).await;
    let a = WsClient::connect(d.addr, &tenant_token("t1")).await;
    let _b = WsClient::connect(d.addr, &tenant_token("t1")).await;
    let (status, body) = refused(d.addr, &format!("/ws?token={}", tenant_token("t1")), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_connections");
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={}", tenant_token("t1")), &[]).await,
        429
    );
    // Closing one frees its slot.
    a.close().await;
    wait_until(|| async { d.metric("citapulse_connections").await == 1.0 }).await;
    let _c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    d.stop().await;
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_cut_off_without_stalling_others_or_leaving_gaps() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.queue_len = 64).await;
    let t1 = tenant_token("t1");

    // A normal dashboard reads everything, concurrently, until the sentinel event.
    let mut normal = WsClient::subscribed(d.addr, "t1").await;
    let normal_task = tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            let m = normal
                .expect(|m| m.get("id").is_some_and(Value::is_i64))
                .await;
            if m["type"] == "sentinel" {
                return ids;
            }
            ids.push(m["id"].as_i64().unwrap());
        }
    });

    // The stuck client subscribes by hand, then reads nothing.
    let mut stuck = RawWs::connect(d.addr, &t1).await;
    assert!(
        stuck
            .send_text(r#"{"type":"subscribe","data":{"channel":"estadisticas:t1"}}"#)
            .await
    );
    wait_until(|| async { d.metric("citapulse_subscriptions").await == 2.0 }).await;

    // Rows far bigger than the socket buffers, until the server gives up on the stuck one.
    let writer = write_32k_rows_until_a_slow_consumer_is_cut_off(&db, &d).await;
    let big = "x".repeat(32 * 1024);
    let insert =
        "INSERT INTO citas (negocio_id, cliente_id, estado) VALUES ('t1', $1, 'pendiente')";

    // Now it reads what the server still sends it while the writes go on.
    let stuck_task = tokio::spawn(async move {
        let (frames, code) = stuck.until_closed(Duration::from_secs(60)).await;
        let ids: Vec<i64> = frames
            .iter()
            .filter_map(Frame::json)
            .filter_map(|m| m["id"].as_i64())
            .collect();
        (ids, code)
    });
    for i in 0..200 {
        writer
            .execute(insert, &[&format!("late-{i}-{big}")])
            .await
            .unwrap();
    }
    let (stuck_ids, code) = stuck_task.await.unwrap();
    let all = db.event_ids("t1").await;
    writer
        .execute("SELECT citapulse.emit('t1', 'sentinel', '{}'::jsonb)", &[])
        .await
        .unwrap();
    let normal_ids = tokio::time::timeout(Duration::from_secs(120), normal_task)
        .await
        .expect("the normal client kept receiving")
        .unwrap();

    assert_eq!(
        normal_ids, all,
        "the normal client got every event, in order"
    );
    assert!(
        code.is_none() || code == Some(4008),
        "closed with 4008 or dropped: {code:?}"
    );
    assert!(stuck_ids.len() < all.len(), "the stuck client was cut off");
    assert!(
        all.starts_with(&stuck_ids),
        "what the stuck client got has no gap: {} ids, first missing after {:?}",
        stuck_ids.len(),
        stuck_ids.last()
    );

    // 4008 means "resume with since": doing so misses nothing.
    let mut resumed = WsClient::connect(d.addr, &t1).await;
    resumed
        .subscribe("t1", Some(stuck_ids.last().copied().unwrap_or(0)))
        .await;
    let missing: std::collections::BTreeSet<i64> = all[stuck_ids.len()..].iter().copied().collect();
    let mut seen = std::collections::BTreeSet::new();
    while !missing.is_subset(&seen) {
        let m = resumed
            .expect(|m| m.get("id").is_some_and(Value::is_i64))
            .await;
        seen.insert(m["id"].as_i64().unwrap());
    }
    d.stop().await;
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_a_gap_free_prefix_then_4008() {
    // Reads, but slower than events arrive: the queue overflows while the server is
    // still writing to it, and nothing queued after the dropped event may reach it.
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.queue_len = 64).await;
    let mut slow = RawWs::connect(d.addr, &tenant_token("t1")).await;
    assert!(
        slow.send_text(r#"{"type":"subscribe","data":{"channel":"estadisticas:t1"}}"#)
            .await
    );
    wait_until(|| async { d.metric("citapulse_subscriptions").await == 1.0 }).await;

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, done) = (db.url.clone(), done.clone());
        tokio::spawn(async move {
            let client = pg(&url).await;
            let big = "z".repeat(32 * 1024);
            let mut rows = 0;
            while !done.load(Ordering::Relaxed) && rows < 5000 {
                client
                    .execute(
                        "INSERT INTO citas (negocio_id, cliente_id, estado) VALUES ('t1', $1, 'pendiente')",
                        &[&format!("{rows}-{big}")],
                    )
                    .await
                    .unwrap();
                rows += 1;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut ids = Vec::new();
    let mut code = None;
    'read: loop {
        while let Some((f, used)) = parse_frame(&slow.buf) {
            slow.buf.drain(..used);
            if f.opcode == OP_CLOSE {
                code = f.close_code();
                break 'read;
            }
            if let Some(id) = f.json().and_then(|m| m["id"].as_i64()) {
                ids.push(id);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut chunk = [0u8; 8 * 1024];
        match tokio::time::timeout_at(deadline, slow.s.read(&mut chunk))
            .await
            .expect("the slow reader is cut off within the wait")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => slow.buf.extend_from_slice(&chunk[..n]),
        }
    }
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let all = db.event_ids("t1").await;
    assert!(d.metric("citapulse_slow_consumer_closes_total").await >= 1.0);
    assert!(code.is_none() || code == Some(4008), "{code:?}");
    assert!(ids.len() < all.len(), "the slow reader was cut off");
    assert!(
        all.starts_with(&ids),
        "no gap: {} ids received, the last {:?}",
        ids.len(),
        ids.last()
    );
    d.stop().await;
}

#[tokio::test]
async fn silent_peers_are_dropped_by_keepalive_and_live_ones_kept() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.limits.ping_interval_secs = 1;
        c.limits.idle_timeout_secs = 2;
    })
    .await;
    let t1 = tenant_token("t1");
    // Upgrades by hand, then never sends a byte again (never answers a ping).
    let mut silent = RawWs::connect(d.addr, &t1).await;
    // A library client answers pings as it reads.
    let mut live = WsClient::connect(d.addr, &t1).await;

    let silent_side = async {
        // Pings keep coming until the drop: one deadline for the whole wait.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut pings = 0;
        while let Some(f) = tokio::time::timeout_at(deadline, silent.frame())
            .await
            .expect("the silent peer is dropped within the wait")
        {
            pings += usize::from(f.opcode == OP_PING);
        }
        pings
    };
    let live_side = async {
        let mut pings = 0;
        while pings < 4 {
            if let Some(Message::Ping(_)) = live.next_frame().await {
                pings += 1;
            }
        }
    };
    let (pings, ()) = tokio::join!(silent_side, live_side);
    assert!(pings >= 1, "the server pinged the silent peer first");
    // The server closed the silent TCP connection (EOF above) and kept the live one.
    live.send(json!({"type": "ping"})).await;
    live.expect_type("pong").await;
    wait_until(|| async { d.metric("citapulse_connections").await == 1.0 }).await;
    d.stop().await;
}

#[tokio::test]
async fn idle_and_slow_http_connections_are_closed() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let eof_within = |mut s: TcpStream| async move {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    };
    // Connects and says nothing.
    let idle = TcpStream::connect(d.addr).await.unwrap();
    // Slowloris: a header line now and then, never the end of the request.
    let mut slow = TcpStream::connect(d.addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (slow_rd, mut slow_wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow_wr
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let slow_eof = async move {
        let mut rd = slow_rd;
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), rd.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    };
    let (idle_closed, slow_closed) = tokio::join!(eof_within(idle), slow_eof);
    trickle.abort();
    assert!(idle_closed, "a silent TCP connection is closed");
    assert!(slow_closed, "a request whose headers never end is closed");
    d.stop().await;
}

// ---------------------------------------------------------------------------------------
// Hostile frames.

#[tokio::test]
async fn malformed_messages_get_bad_request_and_the_socket_stays_usable() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let frames: Vec<(&str, Message)> = vec![
        ("malformed JSON", Message::Text("{\"type\":\"ping\"".into())),
        ("not JSON", Message::Text("hello".into())),
        ("empty", Message::Text("".into())),
        ("JSON array", Message::Text("[1,2]".into())),
        ("JSON null", Message::Text("null".into())),
        ("deep nesting", Message::Text(deep.into())),
        ("no type", Message::Text("{}".into())),
        ("unknown type", Message::Text(r#"{"type":"dance"}"#.into())),
        ("numeric type", Message::Text(r#"{"type":1}"#.into())),
        (
            "subscribe without data",
            Message::Text(r#"{"type":"subscribe"}"#.into()),
        ),
        (
            "subscribe without channel",
            Message::Text(r#"{"type":"subscribe","data":{}}"#.into()),
        ),
        (
            "channel as number",
            Message::Text(r#"{"type":"subscribe","data":{"channel":7}}"#.into()),
        ),
        (
            "since as text",
            Message::Text(
                r#"{"type":"subscribe","data":{"channel":"estadisticas:t1","since":"5"}}"#.into(),
            ),
        ),
        (
            "since beyond i64",
            Message::Text(
                r#"{"type":"subscribe","data":{"channel":"estadisticas:t1","since":1e300}}"#.into(),
            ),
        ),
        (
            "data as string",
            Message::Text(r#"{"type":"unsubscribe","data":"estadisticas:t1"}"#.into()),
        ),
        (
            "auth without token",
            Message::Text(r#"{"type":"auth","data":{}}"#.into()),
        ),
        (
            "token as object",
            Message::Text(r#"{"type":"auth","data":{"token":{}}}"#.into()),
        ),
        (
            "binary frame",
            Message::Binary(br#"{"type":"ping"}"#.to_vec().into()),
        ),
    ];
    for (what, frame) in frames {
        c.send_raw(frame).await;
        let m = c
            .expect(|m| m["type"] == "error" || m["type"] == "pong" || m["type"] == "subscribed")
            .await;
        assert_eq!(m["type"], "error", "{what}: {m}");
        assert_eq!(m["data"]["code"], "bad_request", "{what}: {m}");
        c.send(json!({"type": "ping"})).await;
        c.expect_type("pong").await;
    }
    assert_eq!(d.metric("citapulse_subscriptions").await, 0.0);
    c.subscribe("t1", None).await;

    // Text that is not UTF-8 breaks the protocol itself: 1007, not a crash.
    let mut raw = RawWs::connect(d.addr, &tenant_token("t1")).await;
    assert!(
        raw.write(&client_frame(true, OP_TEXT, &[b'"', 0xff, 0xfe, b'"']))
            .await
    );
    assert_eq!(raw.close_code().await, Some(1007));
    // And the daemon is fine.
    assert_eq!(http_get(d.addr, "/health", &[]).await.0, 200);
    d.stop().await;
}

// ---------------------------------------------------------------------------------------
// Issue 16: findings of the adversarial probe.

#[tokio::test]
async fn rs256_and_hs256_together_each_verify_with_their_own_key_only() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.algorithms = vec!["RS256".into(), "HS256".into()];
        c.auth.public_key_file = Some(key_path("rs256_public.pem"));
    })
    .await;

    // A valid token of each configured algorithm upgrades and works.
    for (what, t) in [
        ("RS256", rs256(&claims(json!({})))),
        ("HS256", hs(Algorithm::HS256, &claims(json!({})))),
    ] {
        let h = handshake(d.addr, &format!("/ws?token={t}"), &[]).await;
        assert_eq!(h.status, 101, "{what}: {}{}", h.head, h.body);
        let mut c = WsClient::connect(d.addr, &t).await;
        c.subscribe("t1", None).await;
    }

    // Still pinned: no key confusion, nothing unlisted, no `none`.
    let rsa_pub = EncodingKey::from_secret(&key_bytes("rs256_public.pem"));
    let rs_private = EncodingKey::from_rsa_pem(&key_bytes("rs256_private.pem")).unwrap();
    let other_key = EncodingKey::from_secret(b"not-the-daemon-secret-0123456789");
    let cases = [
        (
            "HS256 keyed with the RSA public key",
            sign(Algorithm::HS256, &rsa_pub, &claims(json!({}))),
        ),
        (
            "HS256 with another secret",
            sign(Algorithm::HS256, &other_key, &claims(json!({}))),
        ),
        ("ES256, not listed", es256(&claims(json!({})))),
        (
            "RS512, not listed",
            sign(Algorithm::RS512, &rs_private, &claims(json!({}))),
        ),
        (
            "HS384, not listed",
            hs(Algorithm::HS384, &claims(json!({}))),
        ),
        ("alg none", unsigned(&claims(json!({})))),
        ("RS256 expired", rs256(&claims(json!({"exp": now() - 120})))),
    ];
    for (what, t) in &cases {
        let (status, body) = refused(d.addr, &format!("/ws?token={t}"), &[]).await;
        assert_eq!(status, 401, "{what}: {body}");
        let want = if what.ends_with("expired") {
            "token_expired"
        } else {
            "token_invalid"
        };
        assert_eq!(body["error"], want, "{what}: {body}");
    }
    d.stop().await;
}

/// Sends a GET /health whose request line and headers total exactly `size` bytes
/// (the blank line included); returns the status, 0 if the connection just closed.
async fn health_with_head_of(addr: SocketAddr, size: usize) -> u16 {
    let head = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ";
    let pad = size - head.len() - "\r\n\r\n".len();
    let req = format!("{head}{}\r\n\r\n", "a".repeat(pad));
    assert_eq!(req.len(), size);
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("an answer or a close within the wait");
    String::from_utf8_lossy(&out)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn request_headers_are_limited_to_64_kib() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    for (size, want) in [
        (60 * 1024, 200),
        (64 * 1024, 200),
        (64 * 1024 + 1, 431),
        (80 * 1024, 431),
        // Served before the fix: hyper's read buffer overshot `max_buf_size`.
        (100 * 1024, 431),
        (200 * 1024, 431),
    ] {
        let got = health_with_head_of(d.addr, size).await;
        // Refused: 431, or a reset that destroyed it (the server closes with our
        // excess headers unread).
        let ok = got == want || (want == 431 && got == 0);
        assert!(ok, "headers of {size} bytes: {got}, want {want}");
    }
    // A handshake with big (but allowed) headers still upgrades.
    let pad = "b".repeat(60 * 1024);
    let h = handshake(
        d.addr,
        &format!("/ws?token={}", tenant_token("t1")),
        &[("X-Pad", &pad)],
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.body);
    drop(h);
    assert_eq!(http_get(d.addr, "/health", &[]).await.0, 200);
    d.stop().await;
}

#[tokio::test]
async fn a_flood_of_empty_continuation_frames_is_closed_with_1008() {
    // Default limits: the frame meter allows 4 × messages_per_sec frames per second.
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut raw = RawWs::connect(d.addr, &tenant_token("t1")).await;
    // A message that never ends: no complete message ever reaches the message limit.
    assert!(raw.write(&client_frame(false, OP_TEXT, b"")).await);
    let (mut rd, mut wr) = raw.s.into_split();
    let writer = tokio::spawn(async move {
        let empty = client_frame(false, OP_CONT, b"");
        let chunk: Vec<u8> = empty
            .iter()
            .copied()
            .cycle()
            .take(empty.len() * 10_000)
            .collect();
        // Bounded (2 million frames), so that without the limit the test fails below
        // instead of flooding forever.
        for _ in 0..200 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Keep the socket open: a close from the server must come from the limit.
        std::future::pending::<()>().await;
    });
    let buf = std::mem::take(&mut raw.buf);
    let code =
        close_code_under_flood(&mut rd, buf, "the frame flood is closed within the wait").await;
    writer.abort();
    assert_eq!(code, Some(1008), "closed for the rate limit");
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    assert!(
        metrics.contains("reason=\"frame_rate_limited_close\""),
        "counted in client_errors: {metrics}"
    );

    // The daemon is fine, and other clients are unaffected.
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.send(json!({"type": "ping"})).await;
    c.expect_type("pong").await;
    c.subscribe("t1", None).await;
    d.stop().await;
}

// ---------------------------------------------------------------------------------------
// Claim edges: what a token says about itself is checked, not trusted.

/// The `error` of a refused handshake with `token`; `None` when it was accepted.
async fn refusal(addr: SocketAddr, token: &str) -> Option<String> {
    let h = handshake(addr, &format!("/ws?token={token}"), &[]).await;
    (h.status != 101).then(|| {
        serde_json::from_str::<Value>(&h.body).unwrap_or(Value::Null)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    })
}

#[tokio::test]
async fn claim_edges_are_refused_at_the_handshake() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let with = |changes: Value| hs(Algorithm::HS256, &claims(changes));

    // A revoked user: a token claiming to be issued after the revocation must not get
    // round it by naming a time that has not come yet.
    db.client
        .execute("SELECT citapulse.revoke('t1', 'user-t1', 'probe')", &[])
        .await
        .unwrap();
    let before = with(json!({"iat": now() - 60}));
    wait_until(|| async { refusal(d.addr, &before).await.as_deref() == Some("token_revoked") })
        .await;
    let long_sub = "u".repeat(257);
    let cases: Vec<(&str, String)> = vec![
        ("iat an hour ahead", with(json!({"iat": now() + 3600}))),
        ("iat far ahead", with(json!({"iat": 99_999_999_999u64}))),
        ("iat as text", with(json!({"iat": "1700000000"}))),
        ("iat negative", with(json!({"iat": -1}))),
        ("numeric role", with(json!({"sub": "user-2", "role": 1}))),
        ("boolean role", with(json!({"sub": "user-2", "role": true}))),
        ("numeric sub", with(json!({"sub": 42}))),
        ("sub with NUL", with(json!({"sub": "user\u{0}-2"}))),
        ("sub over 256 bytes", with(json!({"sub": long_sub}))),
        ("empty sub", with(json!({"sub": ""}))),
    ];
    for (what, token) in &cases {
        let (status, body) = refused(d.addr, &format!("/ws?token={token}"), &[]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "token_invalid", "{what}: {body}");
    }
    // The controls: within the leeway, a float iat, a string role, a 256-byte sub.
    for (what, token) in [
        (
            "iat 2 s ahead",
            with(json!({"sub": "user-2", "iat": now() + 2})),
        ),
        (
            "float iat",
            with(json!({"sub": "user-2", "iat": now() as f64 - 0.5})),
        ),
        ("role as text", with(json!({"sub": "user-2", "role": "1"}))),
        ("256-byte sub", with(json!({"sub": "u".repeat(256)}))),
    ] {
        assert_eq!(refusal(d.addr, &token).await, None, "{what}");
    }
    d.stop().await;
}

#[tokio::test]
async fn token_fields_cannot_forge_log_lines() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = std::env::temp_dir().join(format!(
        "citapulse-sec-forge-{}-{}.txt",
        std::process::id(),
        free_port()
    ));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = run_binary(
        &["serve"],
        &[
            ("DATABASE_URL", &db.url),
            ("JWT_SECRET", SECRET),
            ("CITAPULSE_LISTEN", &addr.to_string()),
            ("RUST_LOG", "info"),
        ],
        Stdio::from(log),
    )
    .spawn()
    .unwrap();
    wait_until(|| async {
        TcpStream::connect(addr).await.is_ok() && http_get(addr, "/health", &[]).await.0 == 200
    })
    .await;
    let forged = "FORGED  INFO citapulse: admin logged in";
    let evil = hs(
        Algorithm::HS256,
        &claims(json!({
            "sub": format!("u1\n{forged}\r{forged}"),
            "negocio_id": format!("t1\n{forged}"),
            "role": format!("staff\n{forged}"),
        })),
    );
    let c = WsClient::connect(addr, &evil).await;
    c.close().await;
    // A revoked user: the refusal names the user too.
    let sub = format!("u2\n{forged}");
    let revoked = hs(Algorithm::HS256, &claims(json!({"sub": sub})));
    db.client
        .execute("SELECT citapulse.revoke('t1', $1, 'probe')", &[&sub])
        .await
        .unwrap();
    wait_until(|| async { refusal(addr, &revoked).await.as_deref() == Some("token_revoked") })
        .await;
    // Every line about the sockets above is written before the daemon says goodbye.
    let text = stop_and_read_log(child, &log_path).await;
    assert!(text.contains("connection opened"), "{text}");
    for line in text.split(['\n', '\r']) {
        assert!(
            !line.starts_with("FORGED"),
            "a token forged a log line:\n{text}"
        );
    }
}

#[tokio::test]
async fn every_server_message_type_is_reserved_for_emitted_events() {
    use citapulse::delivery::protocol::{CLIENT_MESSAGE_TYPES, SERVER_MESSAGE_TYPES};
    let db = TestDb::new().await;
    let reserved: Vec<String> = db
        .client
        .query_one("SELECT citapulse.reserved_event_types()", &[])
        .await
        .unwrap()
        .get(0);
    let mut want: Vec<String> = SERVER_MESSAGE_TYPES
        .iter()
        .chain(CLIENT_MESSAGE_TYPES.iter())
        .map(|t| t.to_string())
        .collect();
    want.sort();
    want.dedup();
    let mut got = reserved.clone();
    got.sort();
    assert_eq!(
        got, want,
        "sql/install.sql reserves what protocol.rs sends and reads"
    );
    for kind in SERVER_MESSAGE_TYPES
        .iter()
        .chain(CLIENT_MESSAGE_TYPES.iter())
    {
        for variant in [kind.to_string(), kind.to_uppercase()] {
            for sql in [
                "SELECT citapulse.emit('t1', $1, '{}')",
                "SELECT citapulse.emit_to_user('t1', 'u1', $1, '{}')",
                "SELECT citapulse.emit_to_role('t1', 'staff', $1, '{}')",
            ] {
                let err = db
                    .client
                    .query_one(sql, &[&variant])
                    .await
                    .expect_err("a server message type is refused");
                let msg = err.as_db_error().map(|e| e.message().to_string());
                assert!(
                    msg.as_deref().is_some_and(|m| m.contains("reserved")),
                    "{sql} {variant:?}: {msg:?}"
                );
            }
        }
    }
    // The control: an ordinary type goes through all three.
    for sql in [
        "SELECT citapulse.emit('t1', $1, '{}')",
        "SELECT citapulse.emit_to_user('t1', 'u1', $1, '{}')",
        "SELECT citapulse.emit_to_role('t1', 'staff', $1, '{}')",
    ] {
        db.client.query_one(sql, &[&"system_alert"]).await.unwrap();
    }
}

/// SIGTERM to a daemon started with its log in `log_path`; waits for a clean exit and
/// returns the log (then removes it).
async fn stop_and_read_log(mut child: std::process::Child, log_path: &std::path::Path) -> String {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(log_path).unwrap();
    let _ = std::fs::remove_file(log_path);
    text
}

/// Status, head (lowercased) and body of a plain HTTP request (no upgrade headers).
async fn plain_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// `handshakes_refused` for one reason.
async fn refusals(d: &Daemon, reason: &str) -> f64 {
    let text = http_get(d.ops, "/metrics", &[]).await.1;
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("citapulse_handshakes_refused_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

#[tokio::test]
async fn a_plain_get_of_ws_tells_only_whether_the_token_is_accepted() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let good = tenant_token("t1");
    let forged = unsigned(&claims(json!({})));
    let origin = ("Origin", "https://dashboard.example");

    // A refused token: the refused upgrade's 401 and body, readable from another origin,
    // and counted like a refused upgrade.
    let invalid_before = refusals(&d, "token_invalid").await;
    let bearer = format!("Bearer {forged}");
    let (status, head, body) =
        plain_http(d.addr, "GET", "/ws", &[("Authorization", &bearer), origin]).await;
    assert_eq!(status, 401, "{head}");
    let (upgrade_status, upgrade_body) =
        refused(d.addr, "/ws", &[("Authorization", &bearer)]).await;
    assert_eq!(upgrade_status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        upgrade_body,
        "the same body as the refused upgrade"
    );
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(!head.contains("access-control-allow-credentials"), "{head}");
    assert_eq!(
        refusals(&d, "token_invalid").await,
        invalid_before + 2.0,
        "the probe and the upgrade each count"
    );
    // No token at all, and an expired one in the query.
    let (status, _, body) = plain_http(d.addr, "GET", "/ws", &[origin]).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "token_missing"
    );
    let expired = hs(
        Algorithm::HS256,
        &claims(json!({"iat": now() - 7200, "exp": now() - 3600})),
    );
    let (status, _, body) = plain_http(d.addr, "GET", &format!("/ws?token={expired}"), &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "token_expired"
    );

    // An accepted token: 426 and nothing about the token's claims.
    let not_websocket_before = refusals(&d, "not_websocket").await;
    for headers in [
        vec![("Authorization".to_string(), format!("Bearer {good}"))],
        vec![(
            "Sec-WebSocket-Protocol".to_string(),
            format!("citapulse, {good}"),
        )],
    ] {
        let mut headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        headers.push(origin);
        let (status, head, body) = plain_http(d.addr, "GET", "/ws", &headers).await;
        assert_eq!(status, 426, "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(head.contains("access-control-allow-origin: *"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "not_websocket");
        let text = body.to_string();
        for claim in ["user-t1", "t1", "staff"] {
            assert!(!text.contains(claim), "{claim} echoed: {text}");
        }
    }
    let (status, _, _) = plain_http(d.addr, "GET", &format!("/ws?token={good}"), &[]).await;
    assert_eq!(status, 426);
    assert_eq!(
        refusals(&d, "not_websocket").await,
        not_websocket_before + 3.0
    );

    // The preflight of a cross-origin probe: GET with Authorization, no credentials.
    let (status, head, _) = plain_http(
        d.addr,
        "OPTIONS",
        "/ws",
        &[
            origin,
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
    )
    .await;
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("access-control-allow-methods: get"), "{head}");
    assert!(
        head.contains("access-control-allow-headers: authorization"),
        "{head}"
    );
    assert!(!head.contains("access-control-allow-credentials"), "{head}");

    // A real upgrade with the good token still works, and only it is a connection.
    let h = handshake(
        d.addr,
        "/ws",
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(h.status, 101);
    assert_eq!(d.metric("citapulse_connections").await, 1.0);
    d.stop().await;
}

#[tokio::test]
async fn the_client_module_and_its_types_may_be_imported_from_any_origin() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    for path in ["/citapulse.js", "/citapulse.d.ts"] {
        let (status, head, body) = plain_http(
            d.addr,
            "GET",
            path,
            &[("Origin", "https://dashboard.example")],
        )
        .await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains("access-control-allow-origin: *"),
            "{path}: {head}"
        );
        assert!(!head.contains("access-control-allow-credentials"), "{path}");
        assert!(body.contains("CitapulseClient"), "{path}");
    }
    d.stop().await;
}
