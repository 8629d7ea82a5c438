//! TLS to PostgreSQL with libpq's connection parameters and their libpq meaning
//! (DESIGN.md §11): `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, in URLs and in
//! key=value strings. tokio-postgres knows only `disable`, `prefer` and `require` and no
//! certificate files, so these are taken out of the string here, the rest goes to
//! tokio-postgres as it is, and the rustls connector is built from them.
//!
//! - `disable`: plain TCP. `allow` and `prefer` (the default): TLS when the server offers
//!   it (`allow` is read as `prefer`: tokio-postgres cannot try plain first).
//! - `require`: TLS or nothing, the server's certificate not checked; with
//!   `sslrootcert` it is checked as with `verify-ca` (libpq does the same).
//! - `verify-ca`: the chain must lead to a root of `sslrootcert`; `verify-full`: and the
//!   certificate must name the host (a DNS name, or an IP address for an IP host).
//! - `sslrootcert`: a PEM file, or `system` for the Mozilla roots built into the binary.
//!   `verify-*` without it is a start-up error (libpq would look for
//!   `~/.postgresql/root.crt`; a daemon in a container has none).
//! - `sslcert` + `sslkey`: a client certificate for `cert` authentication.
//!
//! Files are read each time a connection is made, so rotated certificates are picked up.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The stream of a connection made with [`Security::connector`].
pub type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server wants it (here: as `prefer`).
    Allow,
    /// TLS when offered (the default).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked without `sslrootcert`.
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, TlsError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(TlsError::BadValue {
                    param: "sslmode",
                    value: value.chars().take(40).collect(),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                });
            }
        })
    }

    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }
}

/// Trust anchors for the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The Mozilla roots built into the binary (`sslrootcert=system`).
    System,
    /// A PEM file.
    File(PathBuf),
}

/// The TLS half of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub roots: Option<Roots>,
    /// `sslcert`.
    pub cert: Option<PathBuf>,
    /// `sslkey`.
    pub key: Option<PathBuf>,
}

/// A TLS setting that cannot work. Never shows the connection string (it may hold a
/// password), only the parameter at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A value libpq would refuse.
    #[error("{param}={value:?} is not one of {expected}")]
    BadValue {
        /// The parameter.
        param: &'static str,
        /// Its value (cut to 40 characters).
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// verify-ca / verify-full without trust anchors.
    #[error(
        "sslmode={0} needs sslrootcert: a PEM file of the server's CA certificates, or sslrootcert=system for the built-in Mozilla roots"
    )]
    NoRoots(&'static str),
    /// A file that cannot be used.
    #[error("{param}={path}: {reason}")]
    File {
        /// The parameter naming it.
        param: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Only one of sslcert and sslkey.
    #[error("sslcert and sslkey go together (a client certificate and its key)")]
    HalfClientCert,
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Splits a connection string (URL or key=value) into what tokio-postgres reads and the
/// TLS settings. The `sslmode` left in the string is tokio-postgres's nearest (`disable`,
/// `prefer` or `require`).
pub fn split(conninfo: &str) -> Result<(String, Security), TlsError> {
    let mut security = Security::default();
    let mut primary = false;
    let mut take = |key: &str, value: &str| -> Result<bool, TlsError> {
        match key {
            // The daemon writes: only sessions that may. libpq's `primary` (not in
            // recovery) is tokio-postgres's `read-write`.
            "target_session_attrs" => match value {
                "any" | "read-write" => return Ok(false),
                "primary" => primary = true,
                _ => {
                    return Err(TlsError::BadValue {
                        param: "target_session_attrs",
                        value: value.chars().take(40).collect(),
                        expected: "any, read-write or primary (the daemon writes, so never a standby)",
                    });
                }
            },
            "sslmode" => security.mode = SslMode::parse(value)?,
            "sslrootcert" => {
                security.roots = Some(if value == "system" {
                    Roots::System
                } else {
                    Roots::File(PathBuf::from(value))
                });
            }
            "sslcert" => security.cert = Some(PathBuf::from(value)),
            "sslkey" => security.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        match conninfo.split_once('?') {
            None => conninfo.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(k), &percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, value, raw) in key_values(conninfo) {
            if !take(key, &value)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    if security.cert.is_some() != security.key.is_some() {
        return Err(TlsError::HalfClientCert);
    }
    let nearest = match security.mode {
        SslMode::Disable => "disable",
        SslMode::Allow | SslMode::Prefer => "prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
    };
    let mut added = format!("sslmode={nearest}");
    if primary {
        added.push_str(" target_session_attrs=read-write");
    }
    let rest = if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("{rest}{sep}{}", added.replace(' ', "&"))
    } else if rest.trim().is_empty() {
        added
    } else {
        format!("{rest} {added}")
    };
    Ok((rest, security))
}

/// `key=value` pairs of a libpq key=value string, with each pair's raw text (values may
/// be single-quoted, with `\'` and `\\` escapes).
fn key_values(s: &str) -> Vec<(&str, String, &str)> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            if !key.is_empty() {
                out.push((key, String::new(), &s[start..i]));
            }
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            let mut chars = s[i..].char_indices();
            let mut end = s.len();
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            value.push(next);
                        }
                    }
                    '\'' => {
                        end = i + at + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            i = end;
        } else {
            let vstart = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&s[vstart..i]);
        }
        out.push((key, value, &s[start..i]));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Security {
    /// How a connection with these settings is checked, for `citapulse check`.
    pub fn describe(&self) -> String {
        match (self.mode, &self.roots) {
            (SslMode::Disable, _) => "plain TCP".into(),
            (SslMode::VerifyFull, _) => "TLS, certificate and host name verified".into(),
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => {
                "TLS, certificate chain verified (not the host name)".into()
            }
            (SslMode::Require, None) => "TLS, certificate not verified".into(),
            (_, Some(_)) => "TLS when the server offers it, certificate chain verified".into(),
            (_, None) => "TLS when the server offers it, certificate not verified".into(),
        }
    }

    /// The connector for tokio-postgres, reading the certificate files now.
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let roots = match &self.roots {
            None => None,
            Some(Roots::System) => Some(RootCertStore::from_iter(
                webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
            )),
            Some(Roots::File(path)) => {
                let mut store = RootCertStore::empty();
                for cert in read_certs("sslrootcert", path)? {
                    store
                        .add(cert)
                        .map_err(|e| file_error("sslrootcert", path, e))?;
                }
                Some(store)
            }
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(TlsError::NoRoots(self.mode.as_str()));
            }
            (SslMode::VerifyFull, Some(roots)) => {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?
            }
            (_, Some(roots)) => Arc::new(ChainOnly(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?,
            )),
            (_, None) => Arc::new(Unverified(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs("sslcert", cert)?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("sslkey", key, e))?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

fn file_error(param: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        param,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn read_certs(
    param: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(param, path, e))?;
    if certs.is_empty() {
        return Err(file_error(param, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// `require` without roots: encrypted, the certificate not checked (as libpq). The
/// handshake's signatures are still verified, so the session is with the key holder.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not. The WebPKI verifier checks
/// the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_of_urls() {
        let (rest, sec) = split(
            "postgres://u:p%40ss@db.example.com:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example.com:5432/app?application_name=x&sslmode=require"
        );
        assert_eq!(sec.mode, SslMode::VerifyFull);
        assert_eq!(sec.roots, Some(Roots::File("/etc/ca.pem".into())));
        let (rest, sec) = split("postgresql://u@h/db").unwrap();
        assert_eq!(rest, "postgresql://u@h/db?sslmode=prefer");
        assert_eq!(sec, Security::default());
    }

    #[test]
    fn libpq_parameters_are_taken_out_of_key_value_strings() {
        let (rest, sec) = split(
            "host=h user=u password='it\\'s x' sslmode = verify-ca sslrootcert=system sslcert=/c.pem sslkey='/k e y.pem'",
        )
        .unwrap();
        assert_eq!(sec.mode, SslMode::VerifyCa);
        assert_eq!(sec.roots, Some(Roots::System));
        assert_eq!(sec.key, Some(PathBuf::from("/k e y.pem")));
        assert!(rest.starts_with("host=h user=u password='it"), "{rest}");
        assert!(rest.ends_with(" sslmode=require"), "{rest}");
        assert!(
            !rest.contains("sslrootcert") && !rest.contains("sslkey"),
            "{rest}"
        );
    }

    #[test]
    fn bad_settings_name_the_parameter_and_never_the_password() {
        let err = split("postgres://u:secret@h/db?sslmode=verify_full").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sslmode") && text.contains("verify-full"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        assert!(matches!(
            split("host=h sslcert=/c.pem").unwrap_err(),
            TlsError::HalfClientCert
        ));
        let (_, sec) = split("host=h sslmode=verify-full").unwrap();
        assert!(matches!(
            sec.connector(),
            Err(TlsError::NoRoots("verify-full"))
        ));
        let (_, sec) = split("host=h sslmode=require sslrootcert=/nonexistent/ca.pem").unwrap();
        let text = sec.connector().err().unwrap().to_string();
        assert!(text.contains("sslrootcert=/nonexistent/ca.pem"), "{text}");
    }

    #[test]
    fn target_session_attrs_take_libpq_values_for_sessions_that_may_write() {
        let (rest, _) = split("postgres://u@h1,h2/db?target_session_attrs=primary").unwrap();
        let pg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(
            pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        let (rest, _) = split("host=h1,h2 target_session_attrs=primary").unwrap();
        let pg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(
            pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        let (rest, _) = split("host=h target_session_attrs=read-write").unwrap();
        assert!(rest.contains("target_session_attrs=read-write"), "{rest}");
        for refused in ["standby", "read-only", "prefer-standby", "nonsense"] {
            let text = split(&format!("host=h target_session_attrs={refused}"))
                .unwrap_err()
                .to_string();
            assert!(
                text.contains("target_session_attrs") && text.contains("never a standby"),
                "{text}"
            );
        }
    }
}
