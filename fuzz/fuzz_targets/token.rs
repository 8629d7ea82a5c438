//! Token verification on arbitrary bytes: never a panic, never an identity without
//! the right signature (the fuzzer cannot forge HMAC, so any `Ok` is a finding).
//!
//! An input that is a JSON object is also taken as claims, signed with the right key
//! and verified: whatever gets in obeys the claim rules (a `sub` of 1–256 bytes without
//! NUL, `iat` not beyond the leeway, a role only from a text `role`).
#![no_main]

use std::sync::OnceLock;

use citapulse::auth::{Authenticator, MAX_CLAIM_BYTES};
use citapulse::config::{AuthConfig, Secret};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SECRET: &str = "fuzz-secret-0123456789abcdef";

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = AuthConfig {
            jwt_secret: Some(Secret::new(SECRET)),
            ..AuthConfig::default()
        };
        match Authenticator::new(&cfg) {
            Ok(a) => a,
            Err(e) => panic!("fuzz authenticator: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        authenticator().verify(text).is_err(),
        "a token the fuzzer made up was accepted"
    );
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let Ok(token) = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key) else {
        return;
    };
    let Ok(id) = authenticator().verify(&token) else {
        return;
    };
    assert_eq!(claims.get("sub").and_then(Value::as_str), Some(id.user_id.as_str()));
    assert!(!id.user_id.is_empty() && id.user_id.len() <= MAX_CLAIM_BYTES);
    assert!(!id.user_id.contains('\0'));
    if let Some(iat) = id.issued_at {
        assert!(iat <= citapulse::clock::unix_now() + 5, "iat {iat} in the future");
    }
    if let Some(role) = &id.role {
        assert_eq!(claims.get("role").and_then(Value::as_str), Some(role.as_str()));
    }
    // A role claim that is not text (or null) refuses the token rather than being dropped.
    assert!(
        matches!(
            claims.get("role"),
            None | Some(Value::Null | Value::String(_))
        ),
        "non-text role {:?} accepted",
        claims.get("role")
    );
});
