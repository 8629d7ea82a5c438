//! Least privilege (DESIGN.md §11): the daemon runs as a login that is neither superuser
//! nor owner of any table, with only what `sql/roles.sql` grants its group role, in
//! trigger and in WAL mode; every feature works and the server logs no privilege error
//! of that login. The group roles cannot do what the daemon never does.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::time::Duration;

use citapulse_testkit::{ClusterOptions, PgCluster};
use serde_json::{Value, json};
use support::*;
use tokio_postgres::Client;

/// A cluster of the test's own: roles are cluster-wide, and its log names the user and
/// SQLSTATE of every error, so a denial anywhere in the daemon shows.
async fn cluster() -> PgCluster {
    PgCluster::start(ClusterOptions {
        settings: vec![("log_line_prefix".into(), "%u %e ".into())],
        ..ClusterOptions::default()
    })
    .await
    .expect("start a cluster")
}

/// Server log lines of `login`'s sessions with SQLSTATE 42501 (insufficient_privilege).
fn denials(cluster: &PgCluster, login: &str) -> Vec<String> {
    let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
    let prefix = format!("{login} 42501 ");
    log.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Creates `login` (LOGIN, `extra` attributes) in `group`; returns its URL after checking
/// it is no superuser and owns nothing.
async fn login_in(db: &TestDb, login: &str, group: &str, extra: &str) -> String {
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN {extra} IN ROLE {group}"
        ))
        .await
        .expect("create the login");
    let row = db
        .client
        .query_one(
            "SELECT r.rolsuper, (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid), \
                    (SELECT count(*) FROM pg_namespace n WHERE n.nspowner = r.oid) \
               FROM pg_roles r WHERE r.rolname = $1",
            &[&login],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "{login} is no superuser");
    assert_eq!(row.get::<_, i64>(1), 0, "{login} owns no relation");
    assert_eq!(row.get::<_, i64>(2), 0, "{login} owns no schema");
    db.url.replacen("postgres@", &format!("{login}@"), 1)
}

/// An appointment of t1 whose 15-minute reminder is due in a few seconds.
async fn appointment_soon(client: &Client) -> i64 {
    client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT 't1', 'c1', 'p1', x::date, x::time, 'pendiente' \
               FROM (SELECT (now() AT TIME ZONE 'UTC') + make_interval(mins => 15, secs => 2) AS x) s \
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn users_of(m: &Value) -> Vec<String> {
    m["data"]["users"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["user_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_daemon_runs_in_trigger_mode_as_a_login_of_citapulse_daemon() {
    let cluster = cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    // The application's own tables that config queries read get their grant from the DBA.
    db.client
        .batch_execute(
            "CREATE TABLE negocios (id text PRIMARY KEY, zona text);
             INSERT INTO negocios VALUES ('t1', 'UTC');
             CREATE TABLE profesionales (id bigint PRIMARY KEY, negocio_id text);
             INSERT INTO profesionales VALUES (1, 't1');
             CREATE TABLE sesiones (id serial PRIMARY KEY, profesional_id bigint, nota text);
             SELECT citapulse.watch('sesiones', tenant_column => NULL, kind => 'sesion');",
        )
        .await
        .unwrap();
    // Twice: idempotent.
    for _ in 0..2 {
        db.client
            .batch_execute(citapulse::db::ROLES_SQL)
            .await
            .expect("roles.sql");
    }
    let login = "citapulse_app";
    let url = login_in(&db, login, "citapulse_daemon", "").await;
    db.client
        .batch_execute(&format!(
            "GRANT SELECT ON negocios, profesionales TO {login}"
        ))
        .await
        .unwrap();

    let d = Daemon::start(&url, |c| {
        c.reminders.minutes_before = vec![15];
        c.tenants.timezone_query = Some("SELECT zona FROM negocios WHERE id = $1".into());
        c.resolvers.push(citapulse::config::ResolverConfig {
            table: "public.sesiones".into(),
            key: "profesional_id".into(),
            query: "SELECT negocio_id FROM profesionales WHERE id = $1::bigint".into(),
        });
        c.auth.notify_secret = Some(citapulse::config::Secret::new("notify-secret"));
        // Not the default: the daemon writes it to citapulse.settings at start.
        c.events.bulk_threshold = 50;
        c.outbox.prune_every = Duration::from_millis(200);
        // The daemon switches the triggers' notifying off at start (citapulse.wakeup).
        c.wakeup.mode = citapulse::config::WakeupMode::Poll;
        c.presence.leave_grace_ms = 300;
    })
    .await;

    // Stats (the stats query reads citas) and an application write.
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    let id = db.insert_cita("t1", "pendiente").await;
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["data"]["row"]["id"], id);
    c.stats_until(|s| s["total_citas"] == 1).await;

    // A table without a tenant column, resolved by the daemon and written back.
    db.client
        .execute(
            "INSERT INTO sesiones (profesional_id, nota) VALUES (1, 'n')",
            &[],
        )
        .await
        .unwrap();
    let ses = c.expect_type("sesion_created").await;
    let ses_id = ses["id"].as_i64().unwrap();
    wait_until(|| async { db.event_ids("t1").await.contains(&ses_id) }).await;

    // A resume replays from the log.
    let mut r = WsClient::connect(d.addr, &tenant_token("t1")).await;
    r.subscribe("t1", Some(ev["id"].as_i64().unwrap() - 1))
        .await;
    assert_eq!(r.expect_type("cita_created").await["id"], ev["id"]);

    // POST /notify/cita publishes through citapulse.emit.
    let (status, body) = http(
        d.addr,
        "POST",
        "/notify/cita",
        &[("X-Citapulse-Secret", "notify-secret")],
        r#"{"negocio_id":"t1","action":"updated"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    c.expect_type("cita_updated").await;

    // A reminder fires (scan, tenant zone, batch fire).
    let soon = appointment_soon(&db.client).await;
    let m = c.expect_type("cita_reminder").await;
    assert_eq!(m["data"]["row"]["id"], soon);
    let zone: String = db
        .client
        .query_one(
            "SELECT zone FROM citapulse.tenant_zones WHERE tenant = 't1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(zone, "UTC");

    // Presence across the database, and a revocation closes the user's socket.
    let mut u1 = WsClient::connect(d.addr, &token("u1", Some("t1"), Some("staff"))).await;
    u1.subscribe("t1", None).await;
    let join = c
        .expect(|m| m["type"] == "presence_join" && users_of(m).contains(&"u1".to_string()))
        .await;
    assert_eq!(join["channel"], "estadisticas:t1");
    c.send(json!({"type": "presence", "data": {"channel": "estadisticas:t1"}}))
        .await;
    assert!(users_of(&c.expect_type("presence").await).contains(&"u1".to_string()));
    db.client
        .execute("SELECT citapulse.revoke('t1', 'u1', 'deactivated')", &[])
        .await
        .unwrap();
    assert_eq!(u1.close_code().await, Some(4003));

    // What the daemon wrote: the settings, the wake-up switch, a prune.
    let row = db
        .client
        .query_one(
            "SELECT s.bulk_threshold, w.notify, w.changed_by FROM citapulse.settings s, citapulse.wakeup w",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 50);
    assert!(!row.get::<_, bool>(1));
    assert!(row.get::<_, Option<String>>(2).is_some());
    let first = ev["id"].as_i64().unwrap();
    db.client
        .execute(
            "UPDATE citapulse.events SET created_at = now() - interval '2 days' WHERE id = $1",
            &[&first],
        )
        .await
        .unwrap();
    wait_until(|| async {
        db.client
            .query_one("SELECT pruned_upto FROM citapulse.settings", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            >= first
    })
    .await;

    // What the daemon runs too rarely to happen here: reminders' hourly prune, and the
    // inbox's VACUUM (before PostgreSQL 17 skipped for a non-owner, with a warning).
    let direct = pg(&url).await;
    for sql in [
        "SELECT citapulse.prune_reminders_sent()",
        "VACUUM (SKIP_LOCKED) citapulse.inbox",
    ] {
        direct.batch_execute(sql).await.expect(sql);
    }
    drop(direct);

    // `citapulse check` as the same login.
    let (code, out, err) = cli(
        &["check"],
        &[("DATABASE_URL", url.as_str()), ("JWT_SECRET", SECRET)],
    );
    assert_eq!(code, 0, "{out}{err}");

    let (status, health) = http_get(d.addr, "/health", &[]).await;
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    d.stop().await;
    let denied = denials(&cluster, login);
    assert!(denied.is_empty(), "denied: {denied:#?}");
}

#[tokio::test]
async fn the_daemon_runs_in_wal_mode_as_a_login_of_citapulse_daemon_wal() {
    let cluster = cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    // Through the CLI this time (it prints the embedded file without --apply).
    let (code, out, _) = cli(&["sql", "roles"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string("sql/roles.sql").unwrap());
    let owner = [("DATABASE_URL", db.url.as_str()), ("JWT_SECRET", SECRET)];
    let (code, out, err) = cli(&["sql", "roles", "--apply"], &owner);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SELECT: citas, horarios"), "{out}");

    let login = "citapulse_wal";
    let url = login_in(&db, login, "citapulse_daemon_wal", "REPLICATION").await;
    let slot = "privileged_not";
    let got: String = db
        .client
        .query_one("SELECT citapulse.capture_mode('wal', $1)", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "wal");
    // As if the slot had been made by hand: the daemon records where it stands itself.
    db.client
        .execute("DELETE FROM citapulse.wal_position", &[])
        .await
        .unwrap();

    let d = Daemon::start(&url, |c| {
        c.capture.slot = slot.into();
        c.outbox.prune_every = Duration::from_millis(200);
    })
    .await;
    wait_until(|| async { d.metric("citapulse_wal_streaming").await >= 1.0 }).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    let mut p1 = WsClient::connect(d.addr, &token("p1", Some("t1"), Some("profesional"))).await;
    assert_eq!(
        p1.subscribe_channel("usuario:t1:p1", None).await["type"],
        "subscribed"
    );
    let id = db.insert_cita("t1", "pendiente").await;
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["data"]["row"]["id"], id);
    // Routed by the daemon's own write of the log.
    assert_eq!(p1.expect_type("cita_created").await["id"], ev["id"]);
    // An oversized tenant is counted by the daemon in WAL mode.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES (repeat('x', 300), 'c')",
            &[],
        )
        .await
        .unwrap();
    wait_until(|| async { d.metric("citapulse_oversized_tenant_rows").await >= 1.0 }).await;
    let soon = appointment_soon(&db.client).await;
    assert_eq!(
        c.expect_type("cita_reminder").await["data"]["row"]["id"],
        soon
    );

    // Back to trigger mode: the daemon drains the slot and drops it.
    let got: String = db
        .client
        .query_one("SELECT citapulse.capture_mode('trigger', $1)", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "trigger");
    let id = db.insert_cita("t1", "confirmada").await;
    c.expect(|m| m["type"] == "cita_created" && m["data"]["row"]["id"] == id)
        .await;
    wait_until(|| async {
        !db.client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;

    let (status, health) = http_get(d.addr, "/health", &[]).await;
    assert_eq!(status, 200, "{health}");
    d.stop().await;
    let denied = denials(&cluster, login);
    assert!(denied.is_empty(), "denied: {denied:#?}");
}

#[tokio::test]
async fn the_daemon_roles_cannot_do_what_the_daemon_never_does() {
    let cluster = cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    db.client
        .batch_execute(citapulse::db::ROLES_SQL)
        .await
        .unwrap();
    let url = login_in(&db, "plain", "citapulse_daemon", "").await;
    let wal_url = login_in(&db, "walrole", "citapulse_daemon_wal", "").await;
    let plain = pg(&url).await;
    let wal = pg(&wal_url).await;
    let never = [
        "INSERT INTO citas (negocio_id) VALUES ('t1')",
        "UPDATE citas SET estado = 'cancelada'",
        "DELETE FROM citas",
        "TRUNCATE citas",
        "SELECT citapulse.watch('citas'::regclass, 'negocio_id', 'appointment', NULL)",
        "SELECT citapulse.unwatch('citas'::regclass)",
        "SELECT citapulse.rewatch_all()",
        "SELECT citapulse.capture_mode('wal')",
        "SELECT citapulse.revoke('t1', 'u1')",
        "SELECT citapulse.unrevoke('t1', 'u1')",
        "SELECT citapulse.emit_to_user('t1', 'u1', 'x', '{}')",
        "SELECT citapulse.emit_to_role('t1', 'r', 'x', '{}')",
        "SELECT citapulse.move_inbox()",
        "UPDATE citapulse.settings SET capture = 'wal'",
        "UPDATE citapulse.settings SET wal_slot = 'other'",
        "INSERT INTO citapulse.inbox (tenant, kind, op) VALUES ('t1', 'x', 'EMIT')",
        "INSERT INTO citapulse.revocations (tenant, user_id) VALUES ('t1', 'u1')",
        "DELETE FROM citapulse.revocations",
        "DELETE FROM citapulse.presence",
        "DELETE FROM citapulse.watches",
        "UPDATE citapulse.events SET row_data = '{}'",
        "TRUNCATE citapulse.events",
        "CREATE TABLE citapulse.mine (i int)",
        "CREATE TABLE public.mine (i int)",
    ];
    assert_permission_denied(&plain, &never).await;
    assert_permission_denied(&wal, &never).await;
    // Only WAL mode writes the log itself.
    assert_permission_denied(
        &plain,
        &[
            "INSERT INTO citapulse.events (tenant, kind, op) VALUES ('t1', 'x', 'EMIT')",
            "SELECT citapulse.wal_drop_slot('citapulse')",
        ],
    )
    .await;
    wal.execute(
        "INSERT INTO citapulse.events (tenant, kind, op) VALUES ('t1', 'x', 'EMIT')",
        &[],
    )
    .await
    .expect("WAL mode writes the log");
    // PostgreSQL 17 and later: the daemon may VACUUM the inbox.
    let (v17, maintain): (bool, bool) = {
        let r = db
            .client
            .query_one(
                "SELECT current_setting('server_version_num')::int >= 170000, \
                        CASE WHEN current_setting('server_version_num')::int >= 170000 \
                             THEN has_table_privilege('citapulse_daemon', 'citapulse.inbox', 'MAINTAIN') \
                             ELSE false END",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(v17, maintain);

    // Installing again (the same version) keeps the grants.
    db.client
        .batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .unwrap();
    let kept: bool = db
        .client
        .query_one(
            "SELECT has_function_privilege('citapulse_daemon', 'citapulse.take_inbox(bigint[])', 'EXECUTE') \
                AND has_column_privilege('citapulse_daemon', 'citapulse.settings', 'pruned_upto', 'UPDATE') \
                AND NOT has_column_privilege('citapulse_daemon', 'citapulse.settings', 'capture', 'UPDATE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(kept);

    // Uninstalling with the roles in place works; dropping them is the DBA's, as told.
    drop((plain, wal));
    db.client
        .batch_execute(citapulse::db::UNINSTALL_SQL)
        .await
        .expect("uninstall.sql with the roles in place");
    db.client
        .batch_execute(
            "DROP ROLE plain, walrole;
             DROP OWNED BY citapulse_daemon_wal, citapulse_daemon;
             DROP ROLE citapulse_daemon_wal, citapulse_daemon;",
        )
        .await
        .expect("drop the roles as roles.sql says");
}
