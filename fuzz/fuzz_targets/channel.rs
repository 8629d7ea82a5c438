//! Channel names and authorization: a validated channel is exactly the prefix plus a
//! safe tenant id, and `authorize` never grants another tenant's channel.
#![no_main]

use citapulse::auth::{
    ChannelError, Identity, MAX_TENANT_LEN, STATS_PREFIX, authorize, channel_tenant,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the identity's shape, the rest is split into claim and channel.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (claim, channel) = text.split_once('\n').unwrap_or(("", text));

    match channel_tenant(channel) {
        Ok(tenant) => {
            assert!(!tenant.is_empty() && tenant.len() <= MAX_TENANT_LEN);
            assert!(
                tenant
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            );
            assert_eq!(channel.len(), STATS_PREFIX.len() + tenant.len());
            assert!(channel.starts_with(STATS_PREFIX) && channel.ends_with(tenant));
        }
        Err(e) => assert_eq!(e, ChannelError::BadName),
    }

    let who = Identity {
        user_id: "fuzz".into(),
        tenant: (mode & 1 == 1).then(|| claim.to_string()),
        role: None,
        expires_at: u64::MAX,
        is_super: mode & 2 == 2,
    };
    match authorize(&who, channel) {
        Ok(tenant) => {
            assert_eq!(channel_tenant(channel), Ok(tenant));
            assert!(who.is_super || who.tenant.as_deref() == Some(tenant));
        }
        Err(ChannelError::Forbidden) => {
            assert!(!who.is_super);
            let tenant = channel_tenant(channel);
            assert!(tenant.is_ok() && who.tenant.as_deref() != tenant.ok());
        }
        Err(ChannelError::BadName) => assert!(channel_tenant(channel).is_err()),
    }
});
