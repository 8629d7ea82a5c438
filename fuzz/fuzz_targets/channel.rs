//! Channel names and authorization: a validated channel is exactly one of the known
//! shapes (`estadisticas:<tenant>`, `usuario:<tenant>:<user>`, `rol:<tenant>:<role>`)
//! built from safe parts, and `authorize` never grants another tenant's channel (nor
//! another user's or role's channel of the same tenant).
#![no_main]

use citapulse::auth::{
    Channel, ChannelError, ChannelKind, Identity, MAX_PERSON_LEN, MAX_TENANT_LEN, ROLE_PREFIX,
    STATS_PREFIX, USER_PREFIX, authorize, channel_tenant,
};
use libfuzzer_sys::fuzz_target;

/// The tenant alphabet, restated here rather than taken from the library.
fn safe_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TENANT_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The user/role alphabet, restated here rather than taken from the library.
fn safe_person(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PERSON_LEN
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the identity's shape, the rest is split into claim and channel.
    // The claim line is `tenant[:user[:role]]`.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (claim, channel) = text.split_once('\n').unwrap_or(("", text));
    let mut parts = claim.splitn(3, ':');
    let claim_tenant = parts.next().unwrap_or("");
    let claim_user = parts.next().unwrap_or("fuzz");
    let claim_role = parts.next();

    let parsed = Channel::parse(channel);
    match &parsed {
        Ok(c) => {
            assert!(safe_tenant(&c.tenant), "unsafe tenant {:?}", c.tenant);
            let expected = match &c.kind {
                ChannelKind::Tenant => format!("{STATS_PREFIX}{}", c.tenant),
                ChannelKind::User(u) => {
                    assert!(safe_person(u), "unsafe user {u:?}");
                    format!("{USER_PREFIX}{}:{u}", c.tenant)
                }
                ChannelKind::Role(r) => {
                    assert!(safe_person(r), "unsafe role {r:?}");
                    format!("{ROLE_PREFIX}{}:{r}", c.tenant)
                }
            };
            assert_eq!(channel, expected, "accepted channel is not its parts");
            assert_eq!(c.to_string(), channel, "channel does not round-trip");
            assert_eq!(channel_tenant(channel), Ok(c.tenant.clone()));
        }
        Err(e) => {
            assert_eq!(*e, ChannelError::BadName);
            assert_eq!(channel_tenant(channel), Err(ChannelError::BadName));
        }
    }

    let who = Identity {
        user_id: claim_user.into(),
        tenant: (mode & 1 == 1).then(|| claim_tenant.to_string()),
        role: (mode & 4 == 4).then(|| claim_role.unwrap_or(claim_tenant).to_string()),
        expires_at: u64::MAX,
        issued_at: None,
        is_super: mode & 2 == 2,
    };
    match authorize(&who, channel) {
        Ok(granted) => {
            assert_eq!(parsed.as_ref(), Ok(&granted));
            if !who.is_super {
                assert_eq!(who.tenant.as_deref(), Some(granted.tenant.as_str()));
                match &granted.kind {
                    ChannelKind::Tenant => {}
                    ChannelKind::User(u) => assert_eq!(*u, who.user_id, "another user's channel"),
                    ChannelKind::Role(r) => {
                        assert_eq!(who.role.as_deref(), Some(r.as_str()), "another role's channel")
                    }
                }
            }
        }
        Err(ChannelError::Forbidden) => {
            assert!(!who.is_super, "a super role was refused a valid channel");
            let Ok(c) = &parsed else {
                panic!("a malformed channel was Forbidden, not BadName");
            };
            let own = who.tenant.as_deref() == Some(c.tenant.as_str())
                && match &c.kind {
                    ChannelKind::Tenant => true,
                    ChannelKind::User(u) => *u == who.user_id,
                    ChannelKind::Role(r) => who.role.as_deref() == Some(r.as_str()),
                };
            assert!(!own, "its own channel was refused");
        }
        Err(ChannelError::BadName) => assert!(parsed.is_err()),
    }
});
