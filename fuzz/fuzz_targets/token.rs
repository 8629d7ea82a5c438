//! Token verification on arbitrary bytes: never a panic, never an identity without
//! the right signature (the fuzzer cannot forge HMAC, so any `Ok` is a finding).
#![no_main]

use std::sync::OnceLock;

use citapulse::auth::Authenticator;
use citapulse::config::{AuthConfig, Secret};
use libfuzzer_sys::fuzz_target;

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = AuthConfig {
            jwt_secret: Some(Secret::new("fuzz-secret-0123456789abcdef")),
            ..AuthConfig::default()
        };
        match Authenticator::new(&cfg) {
            Ok(a) => a,
            Err(e) => panic!("fuzz authenticator: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        authenticator().verify(token).is_err(),
        "a token the fuzzer made up was accepted"
    );
});
