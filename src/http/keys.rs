//! JWT keys that change while the daemon runs (DESIGN.md §10): the JWKS of
//! `auth.jwks_url` / `auth.jwks_file`, read at start, every `auth.jwks_refresh_secs`,
//! when a token names an unknown `kid` (the token waits for that read; at most one read
//! at a time and one per [`UNKNOWN_KID_EVERY`], so random kids cannot make the daemon
//! hammer the identity provider), and on SIGHUP, which also re-reads the configuration
//! file's secrets and `auth.public_key_file`. Sockets stay open: a removed key refuses
//! new handshakes and `auth` refreshes signed with it, and tokens of a key still listed
//! keep working.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::auth::{Authenticator, KeyRefetch};
use crate::config::{AuthConfig, Config};

/// Unknown `kid`s read the JWKS at most this often.
pub const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(10);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the keys come from, and the reads unknown `kid`s asked for.
pub struct Keys {
    auth: Arc<Authenticator>,
    config: Mutex<AuthConfig>,
    source: Option<std::path::PathBuf>,
    /// One read at a time: a refresh, SIGHUP and an unknown `kid` never interleave
    /// (an older document must not overwrite a newer one).
    reading: tokio::sync::Mutex<()>,
    /// Reads asked for by unknown `kid`s: whether one runs, when the last one started.
    refetch: Mutex<Refetch>,
    /// Bumped when such a read ends (whatever its outcome): the tokens waiting on it go on.
    refetched: watch::Sender<u64>,
}

#[derive(Default)]
struct Refetch {
    running: bool,
    started: Option<Instant>,
}

/// Marks the unknown-`kid` read finished, also if its task ends early.
struct RefetchDone(Arc<Keys>);

impl Drop for RefetchDone {
    fn drop(&mut self) {
        crate::sync::lock(&self.0.refetch).running = false;
        self.0.refetched.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Keys {
    /// For the configured sources.
    pub fn new(auth: Arc<Authenticator>, config: &Config) -> Self {
        Self {
            auth,
            config: Mutex::new(config.auth.clone()),
            source: config.loaded_from.clone(),
            reading: tokio::sync::Mutex::new(()),
            refetch: Mutex::new(Refetch::default()),
            refetched: watch::channel(0).0,
        }
    }

    fn uses_jwks(cfg: &AuthConfig) -> bool {
        cfg.jwks_url.is_some() || cfg.jwks_file.is_some()
    }

    /// Reads the JWKS now; an error names the key at fault.
    pub async fn load(&self) -> Result<usize, String> {
        let _one_at_a_time = self.reading.lock().await;
        let cfg = crate::sync::lock(&self.config).clone();
        let text = if let Some(path) = &cfg.jwks_file {
            // A small local file: read in place.
            std::fs::read_to_string(path)
                .map_err(|e| format!("auth.jwks_file: cannot read {}: {e}", path.display()))?
        } else if let Some(url) = &cfg.jwks_url {
            fetch(url, cfg.jwks_ca_file.as_deref())
                .await
                .map_err(|e| format!("auth.jwks_url: {e}"))?
        } else {
            return Ok(0);
        };
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("the JWKS is not a valid key set: {e}"))?;
        // A local file is the operator's own; a URL publishes keys, never shared secrets.
        let allow_hmac = cfg.jwks_file.is_some() || cfg.jwks_allow_hmac;
        let (kept, skipped) = self.auth.set_jwks(&set, allow_hmac)?;
        for why in skipped {
            tracing::warn!(key = %why, "JWKS key ignored");
        }
        tracing::info!(keys = kept, "JWKS loaded");
        Ok(kept)
    }

    /// SIGHUP: the configuration file again (secrets, key files), then the JWKS.
    async fn reload(&self) {
        match Config::load(self.source.as_deref()) {
            Ok(fresh) => match self.auth.reload_static(&fresh.auth) {
                Ok(()) => {
                    *crate::sync::lock(&self.config) = fresh.auth;
                    tracing::info!("SIGHUP: keys and secrets read again");
                }
                Err(err) => tracing::warn!(error = %err, "SIGHUP: keys not reloaded"),
            },
            Err(err) => tracing::warn!(error = %err, "SIGHUP: configuration not reloaded"),
        }
        if let Err(err) = self.load().await {
            tracing::warn!(error = %err, "SIGHUP: JWKS not reloaded");
        }
    }

    /// Keeps the keys current until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let every =
                Duration::from_secs(crate::sync::lock(&self.config).jwks_refresh_secs.max(1));
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                _ = hup => {
                    self.reload().await;
                    continue;
                }
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if Self::uses_jwks(&crate::sync::lock(&self.config).clone())
                && let Err(err) = self.load().await
            {
                tracing::warn!(error = %err, "JWKS refresh failed; keeping the keys read before");
            }
        }
    }
}

impl KeyRefetch for Keys {
    /// Starts a read unless one runs or the last one for an unknown `kid` started less
    /// than [`UNKNOWN_KID_EVERY`] ago, and waits (at most the fetch timeout, plus a
    /// second) for the running one. The read is a task of its own: a client that gives
    /// up does not cancel it for the others waiting.
    fn refetch(self: Arc<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            if !Self::uses_jwks(&crate::sync::lock(&self.config)) {
                return;
            }
            // Subscribed before looking: a read that ends in between is still seen.
            let mut done = self.refetched.subscribe();
            {
                let mut state = crate::sync::lock(&self.refetch);
                if !state.running {
                    if state
                        .started
                        .is_some_and(|at| at.elapsed() < UNKNOWN_KID_EVERY)
                    {
                        return;
                    }
                    state.running = true;
                    state.started = Some(Instant::now());
                    let keys = self.clone();
                    tokio::spawn(async move {
                        let done = RefetchDone(keys);
                        match done.0.load().await {
                            Ok(_) => tracing::info!("JWKS read again for an unknown kid"),
                            Err(err) => tracing::warn!(
                                error = %err,
                                "JWKS read for an unknown kid failed; keeping the keys read before"
                            ),
                        }
                    });
                }
            }
            let _ =
                tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), done.changed()).await;
        })
    }
}

/// GETs an `http://` or `https://` URL (the body, at most [`MAX_JWKS_BYTES`]). `https`
/// trusts the Mozilla roots built into the binary (the image has no CA bundle) and the
/// certificates of `ca_file`, re-read on each fetch so SIGHUP or a refresh picks up a new one.
async fn fetch(url: &str, ca_file: Option<&Path>) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URL must start with http:// or https://".into()),
    };
    let host = uri.host().ok_or("the URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    // `[::1]` in a URL is the address (and TLS name) `::1`.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let work = async {
        let tcp = tokio::net::TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        if !https {
            return get(tcp, &host, &path).await;
        }
        let name = ServerName::try_from(bare_host)
            .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?
            .to_owned();
        let tls = tls_connector(ca_file)?
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        get(tls, &host, &path).await
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

/// One GET over an open connection.
async fn get<S>(stream: S, host: &str, path: &str) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"));
    let body = match res {
        Ok(res) if res.status().is_success() => Limited::new(res.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("reading the body: {e}")),
        Ok(res) => Err(format!("answered {}", res.status())),
        Err(e) => Err(e),
    };
    driver.abort();
    String::from_utf8(body?.to_vec()).map_err(|_| "the body is not UTF-8".to_string())
}

/// TLS client settings: the built-in Mozilla roots plus `ca_file`'s certificates.
fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("auth.jwks_ca_file: cannot read {shown}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("auth.jwks_ca_file: no certificate in {shown}"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("auth.jwks_ca_file: a certificate in {shown}: {e}"))?;
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
