//! Revocation (DESIGN.md §8): `citapulse.revoke` closes the user's sockets on every
//! instance (4003), refuses tokens issued up to it (401) and not later ones, survives a
//! daemon restart, and `citapulse.unrevoke` lifts it. Other users keep their sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// A token minted now, for `sub` in tenant t1.
fn user_token(sub: &str) -> String {
    token(sub, Some("t1"), None)
}

/// Waits until the next whole second: tokens carry `iat` in seconds, and one minted in
/// the second of a revocation counts as issued before it.
async fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_nanos(
        1_000_000_000 - u64::from(now.subsec_nanos()) + 5_000_000,
    ))
    .await;
}

#[tokio::test]
async fn a_revoked_user_is_closed_everywhere_and_refused_until_unrevoked() {
    let db = TestDb::new().await;
    let a = Daemon::start(&db.url, |_| {}).await;
    let b = Daemon::start(&db.url, |_| {}).await;
    let old = user_token("u1");
    let mut on_a = WsClient::connect(a.addr, &old).await;
    let mut on_b = WsClient::connect(b.addr, &old).await;
    on_a.subscribe("t1", None).await;
    let mut bystander = WsClient::connect(b.addr, &user_token("u2")).await;

    db.client
        .execute("SELECT citapulse.revoke('t1', 'u1', 'deactivated')", &[])
        .await
        .unwrap();
    assert_eq!(on_a.close_code().await, Some(4003));
    assert_eq!(on_b.close_code().await, Some(4003));
    assert_eq!(
        refused_status(a.addr, &format!("/ws?token={old}"), &[]).await,
        401
    );
    // Another user of the tenant keeps the socket.
    bystander.send(json!({"type": "ping"})).await;
    assert_eq!(bystander.expect_type("pong").await["type"], "pong");
    assert!(a.metric("citapulse_revocations_total").await >= 1.0);

    // A token issued after the revocation is accepted; the old one still is not, also
    // by a daemon started after it.
    next_second().await;
    let fresh = user_token("u1");
    let mut signed_in = WsClient::connect(b.addr, &fresh).await;
    // Refreshing with the revoked token is refused too; the socket stays.
    signed_in
        .send(json!({"type": "auth", "data": {"token": old}}))
        .await;
    let err = signed_in.expect_type("error").await;
    assert_eq!(err["data"]["code"], "unauthorized", "{err}");
    signed_in.send(json!({"type": "ping"})).await;
    signed_in.expect_type("pong").await;
    signed_in.close().await;
    b.stop().await;
    let c = Daemon::start(&db.url, |_| {}).await;
    assert_eq!(
        refused_status(c.addr, &format!("/ws?token={old}"), &[]).await,
        401
    );

    // Lifted: the old token works again on every instance.
    db.client
        .execute("SELECT citapulse.unrevoke('t1', 'u1')", &[])
        .await
        .unwrap();
    for addr in [a.addr, c.addr] {
        wait_until(|| async {
            match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={old}")).await {
                Ok((mut ws, _)) => {
                    let _ = ws.close(None).await;
                    true
                }
                Err(_) => false,
            }
        })
        .await;
    }
    a.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn revoke_refuses_bad_arguments_and_needs_a_grant() {
    let db = TestDb::new().await;
    for (sql, why) in [
        ("SELECT citapulse.revoke(NULL, 'u1')", "tenant must match"),
        ("SELECT citapulse.revoke('*', 'u1')", "tenant must match"),
        ("SELECT citapulse.revoke('t1', '')", "user_id must be"),
        (
            "SELECT citapulse.revoke('t1', repeat('x', 10240))",
            "user_id must be",
        ),
    ] {
        let err = db.client.execute(sql, &[]).await.unwrap_err();
        let msg = err.as_db_error().unwrap().message().to_string();
        assert!(msg.contains(why), "{sql}: {msg}");
    }
    let count: i64 = db
        .client
        .query_one("SELECT count(*) FROM citapulse.revocations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);

    // A login without a grant can neither revoke nor lift a revocation.
    let weak = login_without_grants(&db, &format!("norevoke_{}", std::process::id())).await;
    assert_permission_denied(
        &weak,
        &[
            "SELECT citapulse.revoke('t1', 'admin')",
            "SELECT citapulse.unrevoke('t1', 'u1')",
        ],
    )
    .await;
}
