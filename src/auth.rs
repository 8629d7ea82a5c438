//! JWT checks and per-tenant authorization.
//!
//! Owns which algorithms and keys are accepted and what a verified identity may read.
//! Must never log a token.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, ConfigError, JwtAlgorithm, KeyFamily, MIN_SECRET_BYTES};

/// The channel prefix for a tenant's statistics and events.
pub const STATS_PREFIX: &str = "estadisticas:";
/// Longest tenant id accepted in a channel name.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest `sub` (and tenant or role claim) accepted, in bytes: what `citapulse.revoke`
/// takes, so every user that gets in can be revoked.
pub const MAX_CLAIM_BYTES: usize = 256;
/// Clock difference tolerated on `exp`, `nbf` and `iat`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// Reads the JWKS again when a token names a `kid` no key has (`http::keys::Keys`);
/// the implementation bounds how often and how long.
pub trait KeyRefetch: Send + Sync {
    /// Resolves once a read started now or already running has finished, at once when
    /// none may start (rate limit), and in any case within the fetch timeout.
    fn refetch(self: Arc<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Why a token was refused; the text is safe to show the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in query, header or subprotocol.
    #[error("missing token")]
    Missing,
    /// The token is past `exp`.
    #[error("token expired")]
    Expired,
    /// Its `kid` names no key of the configured JWKS.
    #[error("invalid token: unknown key id")]
    UnknownKey,
    /// Anything else: bad signature, algorithm, claims or encoding.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

impl AuthError {
    /// The `error` code of the refused handshake (the 401 body on `/ws`, the
    /// `connect_error` on `/socket.io/`).
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Expired => "token_expired",
            Self::Missing => "token_missing",
            Self::UnknownKey => "token_unknown_key",
            Self::Invalid(_) => "token_invalid",
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub user_id: String,
    /// The tenant claim, if present.
    pub tenant: Option<String>,
    /// `role`, if present.
    pub role: Option<String>,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// `iat`, Unix seconds, if the token has one (a revocation refuses tokens issued
    /// before it, and those without `iat`).
    pub issued_at: Option<u64>,
    /// Whether the role is one of `auth.super_roles`.
    pub is_super: bool,
}

/// Verifies tokens with the configured keys and algorithms.
pub struct Authenticator {
    /// One entry per configured algorithm, each with a `Validation` pinned to that
    /// algorithm alone: jsonwebtoken refuses a `Validation` whose list mixes key
    /// families (RS256 with HS256), and a single-algorithm list also guarantees a
    /// token is checked only with the key configured for its own `alg`.
    keys: std::sync::RwLock<Vec<(Algorithm, DecodingKey, Validation)>>,
    /// Keys of the JWKS (`auth.jwks_url`, `auth.jwks_file`) by `kid`, each pinned to
    /// its algorithm, which must be one of `auth.algorithms`.
    by_kid: std::sync::RwLock<HashMap<String, (Algorithm, DecodingKey, Validation)>>,
    /// Whether a JWKS is configured: a token with a `kid` is then checked against it.
    uses_jwks: bool,
    allowed: Vec<Algorithm>,
    template: Validation,
    tenant_claim: String,
    super_roles: HashSet<String>,
    signing: Option<EncodingKey>,
}

/// The library's name for a configured algorithm.
fn library_alg(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

impl Authenticator {
    /// Builds the verifier; fails on unreadable or mismatched key material.
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        let pem = match &cfg.public_key_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| ConfigError::Invalid {
                key: "auth.public_key_file",
                reason: format!("cannot read {}: {e}", path.display()),
            })?),
            None => None,
        };
        let uses_jwks = cfg.jwks_url.is_some() || cfg.jwks_file.is_some();
        for configured in cfg.algorithms()? {
            // With a JWKS, static key material is optional: the JWKS may hold it all.
            let has_material = match configured.family() {
                KeyFamily::Hmac => cfg.jwt_secret.is_some(),
                _ => pem.is_some(),
            };
            if uses_jwks && !has_material {
                continue;
            }
            let bad_key = |e: jsonwebtoken::errors::Error| ConfigError::Invalid {
                key: "auth.public_key_file",
                reason: format!("not a usable {configured} public key: {e}"),
            };
            let pem = pem.as_deref().unwrap_or_default();
            let key = match configured.family() {
                KeyFamily::Hmac => {
                    let secret = cfg.jwt_secret.as_ref().ok_or(ConfigError::Invalid {
                        key: "auth.jwt_secret",
                        reason: "is required for HS* algorithms".into(),
                    })?;
                    DecodingKey::from_secret(secret.expose().as_bytes())
                }
                KeyFamily::Rsa => DecodingKey::from_rsa_pem(pem).map_err(bad_key)?,
                KeyFamily::Ec => DecodingKey::from_ec_pem(pem).map_err(bad_key)?,
                KeyFamily::Ed => DecodingKey::from_ed_pem(pem).map_err(bad_key)?,
            };
            let alg = library_alg(configured);
            keys.push((alg, key));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not merely right when present:
        // `set_issuer` alone lets a token without `iss` through.
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let keys = keys
            .into_iter()
            .map(|(alg, key)| {
                let mut pinned = validation.clone();
                pinned.algorithms = vec![alg];
                (alg, key, pinned)
            })
            .collect();
        let signing = cfg
            .jwt_secret
            .as_ref()
            .map(|s| EncodingKey::from_secret(s.expose().as_bytes()));
        let allowed = cfg.algorithms()?.into_iter().map(library_alg).collect();
        Ok(Self {
            keys: std::sync::RwLock::new(keys),
            by_kid: std::sync::RwLock::new(HashMap::new()),
            uses_jwks,
            allowed,
            template: validation,
            tenant_claim: cfg.tenant_claim.clone(),
            super_roles: cfg.super_roles.iter().cloned().collect(),
            signing,
        })
    }

    /// Verifies a token and extracts the identity.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 8192 {
            return Err(AuthError::Invalid("too long"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed"))?;
        let by_kid = crate::sync::read(&self.by_kid);
        let keys = crate::sync::read(&self.keys);
        let (_, key, validation) = match header.kid.as_deref() {
            Some(kid) if self.uses_jwks => {
                let found = by_kid.get(kid).ok_or(AuthError::UnknownKey)?;
                if found.0 != header.alg {
                    return Err(AuthError::Invalid("algorithm not accepted"));
                }
                found
            }
            _ => keys
                .iter()
                .find(|(alg, _, _)| *alg == header.alg)
                .ok_or(AuthError::Invalid("algorithm not accepted"))?,
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(match claim.as_str() {
                        "exp" => "missing exp",
                        "sub" => "missing sub",
                        "iss" => "missing iss",
                        "aud" => "missing aud",
                        _ => "missing a required claim",
                    })
                }
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted"),
                _ => AuthError::Invalid("malformed"),
            },
        )?;
        let claims = data.claims;
        let user_id = match claims.get("sub") {
            Some(Value::String(s)) if valid_claim_text(s) => s.clone(),
            _ => return Err(AuthError::Invalid("bad sub")),
        };
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(AuthError::Invalid("bad exp"))?;
        let tenant = optional_text(claims.get(&self.tenant_claim), true)
            .map_err(|()| AuthError::Invalid("bad tenant claim"))?;
        let issued_at = match claims.get("iat") {
            None | Some(Value::Null) => None,
            Some(v) => Some(numeric_date(v).ok_or(AuthError::Invalid("bad iat"))?),
        };
        // A token "issued" in the future would outlive a revocation made before that
        // time (a revocation refuses tokens issued up to it).
        if issued_at.is_some_and(|iat| iat > unix_now().saturating_add(LEEWAY_SECS)) {
            return Err(AuthError::Invalid("issued in the future (iat)"));
        }
        // A role is text: a number would become a role name the issuer never wrote.
        let role = optional_text(claims.get("role"), false)
            .map_err(|()| AuthError::Invalid("bad role"))?;
        let is_super = role.as_ref().is_some_and(|r| self.super_roles.contains(r));
        Ok(Identity {
            user_id,
            tenant,
            role,
            expires_at,
            issued_at,
            is_super,
        })
    }

    /// [`verify`](Self::verify), but a token naming a `kid` no key has waits for the
    /// JWKS to be read again (`keys` bounds how often and how long), then is checked
    /// once more: a key published just before its first token is found at the first try.
    pub async fn verify_or_refetch(
        &self,
        token: &str,
        keys: Arc<dyn KeyRefetch>,
    ) -> Result<Identity, AuthError> {
        match self.verify(token) {
            Err(AuthError::UnknownKey) => {
                keys.refetch().await;
                self.verify(token)
            }
            other => other,
        }
    }

    /// Replaces the JWKS keys with those of `set` whose algorithm is accepted (the JWK's
    /// `alg`, or the one accepted algorithm of its key type when it names none); returns
    /// how many were kept and why others were not. HMAC (`oct`) keys must hold at least
    /// [`MIN_SECRET_BYTES`] bytes, and are used only when `allow_hmac`. A set naming one
    /// `kid` twice among the usable keys is refused whole (`Err`, naming the kid), and
    /// the keys read before stay: which of the two a token meant cannot be known.
    pub fn set_jwks(
        &self,
        set: &jsonwebtoken::jwk::JwkSet,
        allow_hmac: bool,
    ) -> Result<(usize, Vec<String>), String> {
        use jsonwebtoken::jwk::{AlgorithmParameters, PublicKeyUse};
        let mut keys = HashMap::new();
        let mut skipped = Vec::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                skipped.push("a key without kid".to_string());
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                skipped.push(format!("{kid:?}: not a signing key (use)"));
                continue;
            }
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) && !allow_hmac {
                skipped.push(format!(
                    "{kid:?}: an HMAC (oct) key from auth.jwks_url (a shared secret in a published key set); set auth.jwks_allow_hmac = true to use it"
                ));
                continue;
            }
            let family_ok = |alg: &Algorithm| {
                let name = format!("{alg:?}");
                match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => name.starts_with("RS") || name.starts_with("PS"),
                    AlgorithmParameters::EllipticCurve(_) => name.starts_with("ES"),
                    AlgorithmParameters::OctetKeyPair(_) => name == "EdDSA",
                    AlgorithmParameters::OctetKey(_) => name.starts_with("HS"),
                    _ => false,
                }
            };
            let alg = match jwk.common.key_algorithm {
                Some(named) => {
                    let parsed: Option<Algorithm> = format!("{named:?}").parse().ok();
                    parsed.filter(|a| self.allowed.contains(a) && family_ok(a))
                }
                None => {
                    let fitting: Vec<&Algorithm> =
                        self.allowed.iter().filter(|a| family_ok(a)).collect();
                    (fitting.len() == 1).then(|| *fitting[0])
                }
            };
            let Some(alg) = alg else {
                skipped.push(format!(
                    "{kid:?}: its algorithm is not one of auth.algorithms"
                ));
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key)
                    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
                        && key.try_get_as_bytes().map_or(0, <[u8]>::len) < MIN_SECRET_BYTES =>
                {
                    let len = key.try_get_as_bytes().map_or(0, <[u8]>::len);
                    skipped.push(format!(
                        "{kid:?}: an HMAC key of {len} bytes (at least {MIN_SECRET_BYTES} are needed)"
                    ));
                }
                Ok(key) => {
                    if keys.contains_key(&kid) {
                        return Err(format!(
                            "the JWKS names kid {kid:?} twice; kept the keys read before"
                        ));
                    }
                    let mut pinned = self.template.clone();
                    pinned.algorithms = vec![alg];
                    keys.insert(kid, (alg, key, pinned));
                }
                Err(e) => skipped.push(format!("{kid:?}: {e}")),
            }
        }
        let kept = keys.len();
        *crate::sync::write(&self.by_kid) = keys;
        Ok((kept, skipped))
    }

    /// Re-reads the static key material (`auth.jwt_secret`, `auth.public_key_file`) from
    /// a freshly loaded configuration (SIGHUP); open sockets are untouched.
    pub fn reload_static(&self, cfg: &AuthConfig) -> Result<(), ConfigError> {
        let fresh = Self::new(cfg)?;
        let keys = std::mem::take(&mut *crate::sync::write(&fresh.keys));
        *crate::sync::write(&self.keys) = keys;
        Ok(())
    }

    /// Mints a development token with the HMAC secret (`citapulse token`, demo).
    pub fn mint(
        &self,
        sub: &str,
        tenant: Option<&str>,
        role: Option<&str>,
        ttl_secs: u64,
    ) -> Option<String> {
        let key = self.signing.as_ref()?;
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::from(sub));
        if let Some(t) = tenant {
            claims.insert(self.tenant_claim.clone(), Value::from(t));
        }
        if let Some(r) = role {
            claims.insert("role".into(), Value::from(r));
        }
        let now = unix_now();
        claims.insert("iat".into(), Value::from(now));
        claims.insert("exp".into(), Value::from(now.saturating_add(ttl_secs)));
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).ok()
    }
}

/// Text a claim may hold: 1 to [`MAX_CLAIM_BYTES`] bytes, no NUL (PostgreSQL text
/// cannot hold one, so such a user could never be revoked).
fn valid_claim_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_CLAIM_BYTES && !s.contains('\0')
}

/// An optional text claim: absent, null or empty is `None`; a number is its text only
/// where `numbers` allows it (integer tenant ids); anything else refuses the token.
fn optional_text(v: Option<&Value>, numbers: bool) -> Result<Option<String>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if valid_claim_text(s) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if numbers => Ok(Some(n.to_string())),
        Some(_) => Err(()),
    }
}

/// A JWT NumericDate (Unix seconds, fractions allowed) as whole seconds.
fn numeric_date(v: &Value) -> Option<u64> {
    match v.as_u64() {
        Some(secs) => Some(secs),
        None => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64),
    }
}

/// Kept at this path for `stats.rs`, which calls `crate::auth::unix_now`; new code
/// uses [`crate::clock::unix_now`].
pub use crate::clock::unix_now;

/// Why a channel name or subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    /// Not a known channel shape.
    BadName,
    /// A well-formed channel of another tenant.
    Forbidden,
}

/// The channel prefix for one user's events (`usuario:<tenant>:<user>`).
pub const USER_PREFIX: &str = "usuario:";
/// The channel prefix for one role's events (`rol:<tenant>:<role>`).
pub const ROLE_PREFIX: &str = "rol:";
/// Longest user id or role accepted in a channel name.
pub const MAX_PERSON_LEN: usize = 128;

/// Whose events a channel carries, besides its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// `estadisticas:<tenant>`: the tenant's events and statistics.
    Tenant,
    /// `usuario:<tenant>:<user>`.
    User(String),
    /// `rol:<tenant>:<role>`.
    Role(String),
}

/// A valid channel name, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    /// The tenant it belongs to.
    pub tenant: String,
    /// Which of the tenant's channels.
    pub kind: ChannelKind,
}

impl Channel {
    /// Parses `estadisticas:<tenant>`, `usuario:<tenant>:<user>` or `rol:<tenant>:<role>`:
    /// a tenant of 1–64 characters of `[A-Za-z0-9_.-]`, a user or role of 1–128 of
    /// `[A-Za-z0-9_.@-]`. Anything else (extra colons, empty parts) is a bad name.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        let person = |rest: &str| -> Result<(String, String), ChannelError> {
            let (tenant, who) = rest.split_once(':').ok_or(ChannelError::BadName)?;
            if is_valid_tenant(tenant) && is_valid_person(who) {
                Ok((tenant.to_string(), who.to_string()))
            } else {
                Err(ChannelError::BadName)
            }
        };
        if let Some(tenant) = name.strip_prefix(STATS_PREFIX) {
            return if is_valid_tenant(tenant) {
                Ok(Self {
                    tenant: tenant.to_string(),
                    kind: ChannelKind::Tenant,
                })
            } else {
                Err(ChannelError::BadName)
            };
        }
        if let Some(rest) = name.strip_prefix(USER_PREFIX) {
            let (tenant, user) = person(rest)?;
            return Ok(Self {
                tenant,
                kind: ChannelKind::User(user),
            });
        }
        if let Some(rest) = name.strip_prefix(ROLE_PREFIX) {
            let (tenant, role) = person(rest)?;
            return Ok(Self {
                tenant,
                kind: ChannelKind::Role(role),
            });
        }
        Err(ChannelError::BadName)
    }

    /// The tenant's own channel.
    pub fn tenant(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            kind: ChannelKind::Tenant,
        }
    }

    /// Its route in the log (`citapulse.events.routes`): `u:<user>`, `r:<role>`; `None`
    /// for the tenant's channel.
    pub fn route(&self) -> Option<String> {
        match &self.kind {
            ChannelKind::Tenant => None,
            ChannelKind::User(u) => Some(format!("u:{u}")),
            ChannelKind::Role(r) => Some(format!("r:{r}")),
        }
    }

    /// The `/metrics` label of its kind.
    pub fn kind_label(&self) -> &'static str {
        match self.kind {
            ChannelKind::Tenant => "tenant",
            ChannelKind::User(_) => "user",
            ChannelKind::Role(_) => "role",
        }
    }

    /// Whether `who` may read it (DESIGN.md §8): a super role reads every channel; a
    /// token of the tenant reads the tenant's channel, its own user's and its own role's.
    pub fn allows(&self, who: &Identity) -> bool {
        if who.is_super {
            return true;
        }
        if who.tenant.as_deref() != Some(self.tenant.as_str()) {
            return false;
        }
        match &self.kind {
            ChannelKind::Tenant => true,
            ChannelKind::User(u) => *u == who.user_id,
            ChannelKind::Role(r) => who.role.as_deref() == Some(r.as_str()),
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ChannelKind::Tenant => write!(f, "{STATS_PREFIX}{}", self.tenant),
            ChannelKind::User(u) => write!(f, "{USER_PREFIX}{}:{u}", self.tenant),
            ChannelKind::Role(r) => write!(f, "{ROLE_PREFIX}{}:{r}", self.tenant),
        }
    }
}

/// Validates a channel name and returns its tenant (any channel kind).
pub fn channel_tenant(channel: &str) -> Result<String, ChannelError> {
    Channel::parse(channel).map(|c| c.tenant)
}

/// A token-derived value for a log line: control characters (newlines above all) are
/// written escaped, so a claim cannot start a line of its own; everything else as is (no
/// quotes, so JSON logs keep a plain string).
pub struct Logged<'a>(pub &'a str);

impl std::fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Whether a tenant id may appear in a channel name.
pub fn is_valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether a user id or role may appear in a channel name.
pub fn is_valid_person(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_PERSON_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// The token of a `?token=` query parameter, decoded.
pub fn token_in_query(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(percent_decode)
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer_token(headers: &hyper::HeaderMap) -> Option<String> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// Decodes `%XX` and `+` in a query value; malformed escapes stay as they are. Walks
/// the input with iterators only: no index the input can push out of bounds.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let mut ahead = bytes.clone();
                match (ahead.next().and_then(hex), ahead.next().and_then(hex)) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        bytes = ahead;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `who` may read `channel`; returns it parsed when allowed.
pub fn authorize(who: &Identity, channel: &str) -> Result<Channel, ChannelError> {
    let parsed = Channel::parse(channel)?;
    if parsed.allows(who) {
        Ok(parsed)
    } else {
        Err(ChannelError::Forbidden)
    }
}

/// Users revoked with `citapulse.revoke(tenant, user_id, reason)` (DESIGN.md §8), as
/// this daemon last read them from `citapulse.revocations` (`delivery::revocation`
/// keeps it current). A token of a revoked user is refused if it was issued at or before
/// the revocation (or carries no `iat`); open sockets of the user are told through
/// [`Revocations::subscribe`].
pub struct Revocations {
    /// (tenant, user) → revocation time, Unix seconds.
    revoked: Mutex<HashMap<(String, String), f64>>,
    news: tokio::sync::broadcast::Sender<(String, String)>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            revoked: Mutex::new(HashMap::new()),
            news: tokio::sync::broadcast::channel(256).0,
        }
    }
}

impl Revocations {
    /// Whether `identity`'s token is refused: its user is revoked in its tenant and the
    /// token was issued at or before that.
    pub fn refuses(&self, identity: &Identity) -> bool {
        let Some(tenant) = &identity.tenant else {
            return false;
        };
        let revoked = crate::sync::lock(&self.revoked);
        match revoked.get(&(tenant.clone(), identity.user_id.clone())) {
            Some(at) => identity.issued_at.is_none_or(|iat| iat as f64 <= *at),
            None => false,
        }
    }

    /// Records a revocation (`Some(time)`) or its lifting (`None`); a revocation new to
    /// this instance is announced to the sockets, and `true` returned.
    pub fn apply(&self, tenant: &str, user: &str, revoked_at: Option<f64>) -> bool {
        let key = (tenant.to_string(), user.to_string());
        let mut revoked = crate::sync::lock(&self.revoked);
        match revoked_at {
            Some(at) => {
                let new = revoked.insert(key.clone(), at) != Some(at);
                drop(revoked);
                if new {
                    // No receiver (no socket open) is fine.
                    let _ = self.news.send(key);
                }
                new
            }
            None => {
                revoked.remove(&key);
                false
            }
        }
    }

    /// New revocations as (tenant, user).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(String, String)> {
        self.news.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn auth() -> Authenticator {
        let cfg = AuthConfig {
            jwt_secret: Some(Secret::new("0123456789abcdef0123")),
            ..AuthConfig::default()
        };
        Authenticator::new(&cfg).unwrap()
    }

    #[test]
    fn minted_token_verifies() {
        let a = auth();
        let t = a.mint("u1", Some("n1"), Some("staff"), 60).unwrap();
        let id = a.verify(&t).unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.tenant.as_deref(), Some("n1"));
        assert!(!id.is_super);
    }

    #[test]
    fn configured_issuer_and_audience_are_required() {
        let cfg = AuthConfig {
            jwt_secret: Some(Secret::new("0123456789abcdef0123")),
            issuer: Some("https://auth.example".into()),
            audience: Some("citapulse".into()),
            ..AuthConfig::default()
        };
        let a = Authenticator::new(&cfg).unwrap();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123");
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let exp = unix_now() + 60;
        let ok = sign(
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://auth.example", "aud": "citapulse"}),
        );
        assert!(a.verify(&ok).is_ok());
        for claims in [
            serde_json::json!({"sub": "u", "exp": exp, "aud": "citapulse"}),
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://auth.example"}),
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://evil.example", "aud": "citapulse"}),
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://auth.example", "aud": "other"}),
        ] {
            assert!(a.verify(&sign(claims.clone())).is_err(), "{claims}");
        }
    }

    #[test]
    fn every_configured_algorithm_maps_to_the_same_library_name() {
        for alg in JwtAlgorithm::ALL {
            assert_eq!(format!("{:?}", library_alg(alg)), alg.as_str());
        }
    }

    #[test]
    fn an_unknown_configured_algorithm_names_the_key() {
        let cfg = AuthConfig {
            jwt_secret: Some(Secret::new("0123456789abcdef0123")),
            algorithms: vec!["HS256".into(), "XS1".into()],
            ..AuthConfig::default()
        };
        let err = Authenticator::new(&cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.algorithms"), "{err}");
    }

    #[test]
    fn logged_claims_cannot_break_a_line() {
        assert_eq!(Logged("u1\nFORGED\r\t").to_string(), "u1\\nFORGED\\r\\t");
        assert_eq!(Logged("José \"x\"").to_string(), "José \"x\"");
    }

    #[test]
    fn claims_are_checked_not_converted() {
        let a = auth();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123");
        let now = unix_now();
        let verify = |changes: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "u", "exp": now + 60, "iat": now, "negocio_id": "t1", "role": "staff"});
            for (k, v) in changes.as_object().into_iter().flatten() {
                claims[k] = v.clone();
            }
            a.verify(&jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap())
        };
        for (what, changes, why) in [
            (
                "future iat",
                serde_json::json!({"iat": now + 60}),
                "issued in the future (iat)",
            ),
            ("text iat", serde_json::json!({"iat": "1"}), "bad iat"),
            ("numeric role", serde_json::json!({"role": 1}), "bad role"),
            ("object role", serde_json::json!({"role": {}}), "bad role"),
            (
                "NUL in sub",
                serde_json::json!({"sub": "a\u{0}b"}),
                "bad sub",
            ),
            (
                "long sub",
                serde_json::json!({"sub": "u".repeat(MAX_CLAIM_BYTES + 1)}),
                "bad sub",
            ),
            (
                "NUL in tenant",
                serde_json::json!({"negocio_id": "t\u{0}"}),
                "bad tenant claim",
            ),
            (
                "array tenant",
                serde_json::json!({"negocio_id": ["t1"]}),
                "bad tenant claim",
            ),
        ] {
            assert_eq!(verify(changes), Err(AuthError::Invalid(why)), "{what}");
        }
        let id =
            verify(serde_json::json!({"iat": now + LEEWAY_SECS, "negocio_id": 7, "role": null}))
                .unwrap();
        assert_eq!(
            id.tenant.as_deref(),
            Some("7"),
            "integer tenant ids travel as text"
        );
        assert_eq!(id.role, None);
        assert_eq!(
            verify(serde_json::json!({"iat": 1.5e9})).unwrap().issued_at,
            Some(1_500_000_000)
        );
    }

    #[test]
    fn jwks_hmac_keys_are_long_enough_and_kids_unique() {
        let a = Authenticator::new(&AuthConfig {
            jwks_file: Some("/unused".into()),
            ..AuthConfig::default()
        })
        .unwrap();
        let oct = |kid: &str, k: &str| serde_json::json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": k});
        let parse = |keys: serde_json::Value| -> jsonwebtoken::jwk::JwkSet {
            serde_json::from_value(serde_json::json!({ "keys": keys })).unwrap()
        };
        // "MDEyMzQ1Njc4OWFiY2RlZg" is 16 bytes, "MDEyMzQ1Njc4OWFiY2Rl" 15.
        let set = parse(serde_json::json!([
            oct("empty", ""),
            oct("short", "MDEyMzQ1Njc4OWFiY2Rl"),
            oct("ok", "MDEyMzQ1Njc4OWFiY2RlZg"),
            {"kty": "oct", "kid": "enc", "use": "enc", "alg": "HS256", "k": "MDEyMzQ1Njc4OWFiY2RlZg"},
        ]));
        let (kept, skipped) = a.set_jwks(&set, true).unwrap();
        assert_eq!(kept, 1, "{skipped:?}");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        let (kept, skipped) = a.set_jwks(&set, false).unwrap();
        assert_eq!(kept, 0, "no shared secrets from a URL: {skipped:?}");
        let twice = parse(serde_json::json!([
            oct("k", "MDEyMzQ1Njc4OWFiY2RlZg"),
            oct("k", "MDEyMzQ1Njc4OWFiY2RlZmdo"),
        ]));
        let err = a.set_jwks(&twice, true).unwrap_err();
        assert!(err.contains("\"k\" twice"), "{err}");
    }

    #[test]
    fn alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"}.{"sub":"u","exp":9999999999,"negocio_id":"n1"}.
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5LCJuZWdvY2lvX2lkIjoibjEifQ.";
        assert!(auth().verify(t).is_err());
    }

    #[test]
    fn channels_are_validated() {
        assert_eq!(
            channel_tenant("estadisticas:negocio_1"),
            Ok("negocio_1".to_string())
        );
        assert_eq!(channel_tenant("estadisticas:"), Err(ChannelError::BadName));
        assert_eq!(
            channel_tenant("estadisticas:a b"),
            Err(ChannelError::BadName)
        );
        assert_eq!(channel_tenant("estadisticas:*"), Err(ChannelError::BadName));
        assert_eq!(channel_tenant("other:x"), Err(ChannelError::BadName));
        let long = format!("estadisticas:{}", "a".repeat(65));
        assert_eq!(channel_tenant(&long), Err(ChannelError::BadName));
        let longest = format!("estadisticas:{}", "a".repeat(64));
        assert_eq!(channel_tenant(&longest), Ok("a".repeat(64)));
        for bad in [
            "estadisticas:../x",
            "estadisticas:a/b",
            "estadisticas:ñ",
            "estadisticas:a\u{0}",
            "Estadisticas:a",
            " estadisticas:a",
            "estadisticas:a ",
            "estadisticas:a:b",
        ] {
            assert_eq!(channel_tenant(bad), Err(ChannelError::BadName), "{bad:?}");
        }
    }

    #[test]
    fn person_channels_are_validated() {
        let user = Channel::parse("usuario:n1:p-7@x.org").unwrap();
        assert_eq!(user.tenant, "n1");
        assert_eq!(user.kind, ChannelKind::User("p-7@x.org".into()));
        assert_eq!(user.route().as_deref(), Some("u:p-7@x.org"));
        assert_eq!(user.to_string(), "usuario:n1:p-7@x.org");
        let role = Channel::parse("rol:n1:admin").unwrap();
        assert_eq!(role.kind, ChannelKind::Role("admin".into()));
        assert_eq!(role.route().as_deref(), Some("r:admin"));
        let long_user = format!("usuario:n1:{}", "u".repeat(129));
        let long_tenant = format!("usuario:{}:u", "t".repeat(65));
        let huge = format!("rol:n1:{}", "r".repeat(10_000));
        for bad in [
            "usuario:n1",
            "usuario:n1:",
            "usuario::u",
            "usuario:n1:u:extra",
            "usuario:n1:*",
            "usuario:n1:ñ",
            "usuario:n@1:u",
            "rol:n1",
            "rol:n1:",
            "rol:n1:a:b",
            "rol:n1:a b",
            "Usuario:n1:u",
            "usuario:n1:u\u{0}",
            long_user.as_str(),
            long_tenant.as_str(),
            huge.as_str(),
        ] {
            assert_eq!(Channel::parse(bad), Err(ChannelError::BadName), "{bad:?}");
        }
    }

    #[test]
    fn person_channels_are_for_that_person_of_that_tenant() {
        let mut who = identity(Some("n1"), false);
        who.role = Some("admin".into());
        let may = |c: &str| authorize(&who, c).is_ok();
        assert!(may("estadisticas:n1"));
        assert!(may("usuario:n1:u"), "own user");
        assert!(may("rol:n1:admin"), "own role");
        assert!(!may("usuario:n1:v"), "another user of the tenant");
        assert!(!may("rol:n1:staff"), "another role");
        assert!(!may("usuario:n2:u"), "same user id in another tenant");
        assert!(!may("rol:n2:admin"), "same role in another tenant");
        let root = identity(None, true);
        assert!(authorize(&root, "usuario:n2:v").is_ok());
        assert!(authorize(&root, "rol:n2:x").is_ok());
        let no_tenant = identity(None, false);
        assert!(authorize(&no_tenant, "usuario:n1:u").is_err());
    }

    fn identity(tenant: Option<&str>, is_super: bool) -> Identity {
        Identity {
            user_id: "u".into(),
            tenant: tenant.map(str::to_string),
            role: None,
            expires_at: u64::MAX,
            issued_at: Some(100),
            is_super,
        }
    }

    #[test]
    fn a_revocation_refuses_tokens_issued_up_to_it_and_is_lifted() {
        let r = Revocations::default();
        let mut news = r.subscribe();
        let id = identity(Some("t1"), false);
        assert!(!r.refuses(&id));
        r.apply("t1", "u", Some(100.5));
        assert_eq!(
            news.try_recv().unwrap(),
            ("t1".to_string(), "u".to_string())
        );
        assert!(r.refuses(&id), "issued before");
        assert!(
            !r.refuses(&Identity {
                issued_at: Some(101),
                ..id.clone()
            }),
            "issued after"
        );
        assert!(
            r.refuses(&Identity {
                issued_at: None,
                ..id.clone()
            }),
            "no iat"
        );
        assert!(
            !r.refuses(&identity(Some("t2"), false)),
            "another tenant's user u"
        );
        assert!(
            !r.refuses(&identity(None, true)),
            "no tenant: not this user"
        );
        r.apply("t1", "u", None);
        assert!(!r.refuses(&id));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const TENANT: &str = "[A-Za-z0-9_.-]{1,64}";

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Every safe tenant id round-trips through its channel name.
            #[test]
            fn valid_tenants_round_trip(tenant in TENANT) {
                let channel = format!("{STATS_PREFIX}{tenant}");
                prop_assert_eq!(channel_tenant(&channel), Ok(tenant.clone()));
            }

            /// Whatever the input, an accepted channel is the prefix plus a safe tenant.
            #[test]
            fn accepted_channels_are_safe(channel in any::<String>()) {
                if let Ok(parsed) = Channel::parse(&channel) {
                    prop_assert!(is_valid_tenant(&parsed.tenant));
                    prop_assert_eq!(parsed.to_string(), channel.clone());
                }
            }

            /// Prefix plus anything with one unsafe character, or too long, is refused.
            #[test]
            fn unsafe_tenants_are_refused(
                head in "[A-Za-z0-9_.-]{0,30}",
                bad in "[^A-Za-z0-9_.-]",
                tail in "[A-Za-z0-9_.-]{0,30}",
            ) {
                let channel = format!("{STATS_PREFIX}{head}{bad}{tail}");
                prop_assert_eq!(channel_tenant(&channel), Err(ChannelError::BadName));
            }

            #[test]
            fn too_long_tenants_are_refused(tenant in "[A-Za-z0-9]{65,200}") {
                let channel = format!("{STATS_PREFIX}{tenant}");
                prop_assert_eq!(channel_tenant(&channel), Err(ChannelError::BadName));
            }

            /// A non-super identity reads its own tenant's channel and no other.
            #[test]
            fn authorization_is_per_tenant(own in TENANT, other in TENANT) {
                let who = identity(Some(&own), false);
                let own_channel = format!("{STATS_PREFIX}{own}");
                let tenant_of = |c: &str| authorize(&who, c).map(|c| c.tenant);
                prop_assert_eq!(tenant_of(&own_channel), Ok(own.clone()));
                let other_channel = format!("{STATS_PREFIX}{other}");
                let expected = if other == own { Ok(other.clone()) } else { Err(ChannelError::Forbidden) };
                prop_assert_eq!(tenant_of(&other_channel), expected);
                let nobody = identity(None, false);
                prop_assert_eq!(authorize(&nobody, &other_channel), Err(ChannelError::Forbidden));
                let root = identity(None, true);
                prop_assert_eq!(authorize(&root, &other_channel).map(|c| c.tenant), Ok(other.clone()));
            }

            /// Even a super role gets nothing from a malformed channel.
            #[test]
            fn super_roles_still_need_valid_names(channel in any::<String>()) {
                let root = identity(None, true);
                prop_assert_eq!(authorize(&root, &channel), Channel::parse(&channel));
            }

            /// Arbitrary text is never an identity.
            #[test]
            fn garbage_tokens_are_refused(token in any::<String>()) {
                prop_assert!(auth().verify(&token).is_err());
            }
        }
    }
}
