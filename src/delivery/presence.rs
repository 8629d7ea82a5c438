//! Presence (DESIGN.md §8): who is online in each tenant, across every daemon on the
//! database, with PostgreSQL as the bus (`citapulse.presence`, no Redis).
//!
//! Every subscriber of `estadisticas:<tenant>` is present in that tenant. Each daemon
//! counts its own users' connections ([`Presence::joined`], [`Presence::left`]) and
//! writes what changed at most every [`TICK`], with a heartbeat; a user whose last
//! connection closed is written as gone only after `presence.leave_grace_ms`, so a
//! reload or a reconnect to another instance is no leave. Every daemon reads the rows
//! above the last version it saw each [`TICK`], merges them over the live daemons
//! (heartbeat younger than `presence.ttl_ms`) and sends each tenant's joins and leaves
//! of that read as one `presence_join` and one `presence_leave` message: a reconnect
//! storm costs each channel at most two messages per tick.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::db::{self, DbError};
use crate::delivery::hub::Hub;
use crate::delivery::protocol;
use crate::metrics::Metrics;
use crate::sync::lock;
use crate::tasks::Exit;

/// How often changes are written and read.
pub const TICK: Duration = Duration::from_millis(200);

/// (tenant, user).
type Key = (Arc<str>, Arc<str>);

/// One present user, as clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The user's `role` (of its first connection).
    pub role: Option<String>,
    /// Connections across every instance.
    pub connections: u32,
    /// Unix seconds of its earliest connection still open.
    pub since: f64,
}

impl Member {
    fn json(&self, user: &str) -> Value {
        json!({"user_id": user, "role": self.role, "connections": self.connections, "since": self.since})
    }
}

/// This daemon's own users.
#[derive(Debug)]
struct LocalMember {
    role: Option<String>,
    connections: u32,
    since: f64,
    /// When the last connection closed (a leave once the grace has passed).
    gone_at: Option<Instant>,
    /// The connections last written (None: never).
    written: Option<u32>,
}

pub use crate::db::PresenceRow as Row;
use crate::db::PresenceUpdate;

fn update(key: &Key, role: Option<String>, connections: u32, since: f64) -> PresenceUpdate {
    PresenceUpdate {
        tenant: key.0.clone(),
        user: key.1.clone(),
        role,
        connections,
        since,
    }
}

/// Every daemon's rows as read so far, and the members they add up to.
#[derive(Debug, Default)]
pub struct View {
    rows: HashMap<(String, Key), (Option<String>, u32, f64)>,
    members: HashMap<Key, Member>,
}

/// What one read changed, per tenant.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Users whose first connection arrived.
    pub joined: HashMap<Arc<str>, Vec<(Arc<str>, Member)>>,
    /// Users whose last connection left.
    pub left: HashMap<Arc<str>, Vec<(Arc<str>, Member)>>,
}

impl View {
    /// Applies rows read (in version order) and the daemons alive now; returns the joins
    /// and leaves. Rows of daemons no longer alive are forgotten: a daemon given up for
    /// dead writes all its users again when it comes back.
    pub fn apply(&mut self, rows: Vec<Row>, live: &HashSet<String>) -> Changes {
        for r in rows {
            let key = (
                r.instance,
                (Arc::from(r.tenant.as_str()), Arc::from(r.user_id.as_str())),
            );
            if r.connections == 0 {
                self.rows.remove(&key);
            } else {
                self.rows.insert(key, (r.role, r.connections, r.since));
            }
        }
        self.rows.retain(|(instance, _), _| live.contains(instance));
        let mut members: HashMap<Key, Member> = HashMap::with_capacity(self.members.len());
        for ((_, key), (role, connections, since)) in &self.rows {
            let m = members.entry(key.clone()).or_insert_with(|| Member {
                role: role.clone(),
                connections: 0,
                since: *since,
            });
            m.connections += connections;
            m.since = m.since.min(*since);
            if m.role.is_none() {
                m.role.clone_from(role);
            }
        }
        let mut changes = Changes::default();
        for (key, m) in &members {
            if !self.members.contains_key(key) {
                changes
                    .joined
                    .entry(key.0.clone())
                    .or_default()
                    .push((key.1.clone(), m.clone()));
            }
        }
        for (key, m) in &self.members {
            if !members.contains_key(key) {
                changes.left.entry(key.0.clone()).or_default().push((
                    key.1.clone(),
                    Member {
                        connections: 0,
                        ..m.clone()
                    },
                ));
            }
        }
        self.members = members;
        changes
    }

    /// Users present in a tenant, by user id.
    pub fn users(&self, tenant: &str) -> Vec<Value> {
        let mut users: Vec<(&Arc<str>, &Member)> = self
            .members
            .iter()
            .filter(|((t, _), _)| &**t == tenant)
            .map(|((_, u), m)| (u, m))
            .collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        users.into_iter().map(|(u, m)| m.json(u)).collect()
    }

    /// How many users are present, in all tenants.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether nobody is present.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// This daemon's presence: its own users (written to the database) and the view of
/// every daemon's (read from it).
pub struct Presence {
    /// Whether presence is tracked at all (`presence.enabled`).
    pub enabled: bool,
    /// The key of this daemon's rows: unique per process start, so two daemons
    /// configured with the same `instance` never share rows.
    instance: String,
    grace: Duration,
    ttl: Duration,
    local: Mutex<HashMap<Key, LocalMember>>,
    dirty: Mutex<HashSet<Key>>,
    view: Mutex<View>,
}

impl Presence {
    /// Presence as configured.
    pub fn new(config: &Config) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            enabled: config.presence.enabled,
            instance: format!("{}:{}:{started}", config.instance, std::process::id()),
            grace: Duration::from_millis(config.presence.leave_grace_ms),
            ttl: Duration::from_millis(config.presence.ttl_ms),
            local: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            view: Mutex::new(View::default()),
        }
    }

    /// A subscriber of `estadisticas:<tenant>` arrived.
    pub fn joined(&self, tenant: &str, user: &str, role: Option<&str>) {
        if !self.enabled {
            return;
        }
        let key: Key = (Arc::from(tenant), Arc::from(user));
        let mut local = lock(&self.local);
        let m = local.entry(key.clone()).or_insert_with(|| LocalMember {
            role: role.map(str::to_string),
            connections: 0,
            since: crate::clock::unix_now_f64(),
            gone_at: None,
            written: None,
        });
        m.connections += 1;
        m.gone_at = None;
        drop(local);
        lock(&self.dirty).insert(key);
    }

    /// A subscriber of `estadisticas:<tenant>` left (unsubscribed or disconnected).
    pub fn left(&self, tenant: &str, user: &str) {
        if !self.enabled {
            return;
        }
        let key: Key = (Arc::from(tenant), Arc::from(user));
        let mut local = lock(&self.local);
        let Some(m) = local.get_mut(&key) else {
            return;
        };
        m.connections = m.connections.saturating_sub(1);
        if m.connections == 0 {
            m.gone_at = Some(Instant::now());
        }
        drop(local);
        lock(&self.dirty).insert(key);
    }

    /// The users present in a tenant (across every daemon).
    pub fn users(&self, tenant: &str) -> Vec<Value> {
        lock(&self.view).users(tenant)
    }

    /// The rows to write now: changed counts, and leaves whose grace has passed (these
    /// are forgotten locally). Users still within their grace stay pending. With `all`,
    /// every local user (after this daemon was given up for dead).
    fn due(&self, now: Instant, all: bool) -> Vec<PresenceUpdate> {
        let mut local = lock(&self.local);
        let mut dirty = lock(&self.dirty);
        let keys: Vec<Key> = if all {
            local.keys().cloned().collect()
        } else {
            dirty.iter().cloned().collect()
        };
        let mut out = Vec::new();
        for key in keys {
            let Some(m) = local.get_mut(&key) else {
                dirty.remove(&key);
                continue;
            };
            if m.connections == 0 {
                match m.gone_at {
                    Some(at) if now.saturating_duration_since(at) >= self.grace => {
                        if m.written.is_some() {
                            out.push(update(&key, m.role.clone(), 0, m.since));
                        }
                        local.remove(&key);
                        dirty.remove(&key);
                    }
                    // Within the grace: the last written count stands meanwhile.
                    _ => {}
                }
                continue;
            }
            dirty.remove(&key);
            if all || m.written != Some(m.connections) {
                m.written = Some(m.connections);
                out.push(update(&key, m.role.clone(), m.connections, m.since));
            }
        }
        out
    }

    /// Writes what is due, with the heartbeat; true if this daemon had been given up for
    /// dead (then everything is written again).
    async fn write(&self, client: &Client, all: bool) -> Result<bool, DbError> {
        let rows = self.due(Instant::now(), all);
        let ttl = i32::try_from(self.ttl.as_millis()).unwrap_or(i32::MAX);
        let stale = db::presence_write(client, &self.instance, ttl, &rows, None).await?;
        Ok(stale)
    }

    /// Reads what every daemon wrote since `version` and sends the joins and leaves.
    async fn read(
        &self,
        client: &Client,
        version: i64,
        hub: &Hub,
        metrics: &Metrics,
    ) -> Result<i64, DbError> {
        let ttl = i32::try_from(self.ttl.as_millis()).unwrap_or(i32::MAX);
        let (rows, live, last) = db::presence_since(client, version, ttl).await?;
        let mut view = lock(&self.view);
        let changes = view.apply(rows, &live);
        metrics.presence_members.set(view.len() as i64);
        drop(view);
        for (kind, by_tenant) in [
            (protocol::types::PRESENCE_JOIN, changes.joined),
            (protocol::types::PRESENCE_LEAVE, changes.left),
        ] {
            for (tenant, mut users) in by_tenant {
                users.sort_by(|a, b| a.0.cmp(&b.0));
                let channel = format!("{}{tenant}", crate::auth::STATS_PREFIX);
                let users: Vec<Value> = users.iter().map(|(u, m)| m.json(u)).collect();
                let msg = json!({"type": kind, "channel": channel, "data": {"users": users}});
                if hub.publish_presence(&tenant, Utf8Bytes::from(msg.to_string())) {
                    metrics.presence_messages.inc();
                }
            }
        }
        Ok(last.max(version))
    }
}

/// Writes and reads presence until shutdown, reconnecting after errors. At shutdown the
/// heartbeat is dated back so the others count this daemon's users for one more grace
/// period (they may reconnect elsewhere meanwhile) instead of a whole ttl.
pub async fn run(
    config: Arc<Config>,
    presence: Arc<Presence>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Exit {
    if !presence.enabled {
        return Exit::Off;
    }
    let heartbeat_every = presence.ttl / 3;
    loop {
        match db::connect_as(&config, "citapulse-presence").await {
            Ok((client, conn)) => {
                let driver = tokio::spawn(conn);
                // A new connection reads everything again: rows deleted meanwhile (left
                // users of dead daemons) are then gone from the view too.
                let mut version = 0;
                let mut last_beat: Option<Instant> = None;
                loop {
                    let step = async {
                        let now = Instant::now();
                        let beat = last_beat.is_none_or(|t| now - t >= heartbeat_every);
                        let pending = !lock(&presence.dirty).is_empty();
                        if beat || pending {
                            let stale = presence.write(&client, false).await?;
                            if stale {
                                presence.write(&client, true).await?;
                            }
                            if beat {
                                last_beat = Some(now);
                            }
                        }
                        presence.read(&client, version, &hub, &metrics).await
                    };
                    match step.await {
                        Ok(v) => version = v,
                        Err(err) => {
                            tracing::warn!(error = ?err, "presence failed; reconnecting");
                            break;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(TICK) => {}
                        _ = shutdown.changed() => {
                            let ttl = i32::try_from(presence.ttl.as_millis()).unwrap_or(i32::MAX);
                            let grace = i32::try_from(presence.grace.as_millis()).unwrap_or(0);
                            if let Err(err) = db::presence_write(&client, &presence.instance, ttl, &[], Some(grace)).await {
                                tracing::warn!(error = %err, "presence: final heartbeat failed");
                            }
                            driver.abort();
                            return Exit::Returned;
                        }
                    }
                }
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "cannot connect for presence"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Exit::Returned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(instance: &str, user: &str, connections: u32, since: f64) -> Row {
        Row {
            instance: instance.into(),
            tenant: "t1".into(),
            user_id: user.into(),
            role: Some("staff".into()),
            connections,
            since,
        }
    }

    fn live(instances: &[&str]) -> HashSet<String> {
        instances.iter().map(|s| s.to_string()).collect()
    }

    fn names(c: &HashMap<Arc<str>, Vec<(Arc<str>, Member)>>) -> Vec<String> {
        let mut v: Vec<String> = c
            .values()
            .flatten()
            .map(|(u, m)| format!("{u}:{}", m.connections))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_user_joins_once_across_instances_and_leaves_with_its_last_connection() {
        let mut view = View::default();
        let both = live(&["a", "b"]);
        let c = view.apply(vec![row("a", "u1", 1, 10.0)], &both);
        assert_eq!(names(&c.joined), ["u1:1"]);
        // The same user on another instance: no second join.
        let c = view.apply(vec![row("b", "u1", 2, 5.0)], &both);
        assert!(c.joined.is_empty() && c.left.is_empty());
        assert_eq!(view.users("t1")[0]["connections"], 3);
        assert_eq!(view.users("t1")[0]["since"], 5.0);
        let c = view.apply(vec![row("a", "u1", 0, 10.0)], &both);
        assert!(c.left.is_empty(), "still on b");
        let c = view.apply(vec![row("b", "u1", 0, 5.0)], &both);
        assert_eq!(names(&c.left), ["u1:0"]);
        assert!(view.is_empty());
    }

    #[test]
    fn users_of_a_dead_instance_leave_and_come_back_with_it() {
        let mut view = View::default();
        view.apply(
            vec![
                row("a", "u1", 1, 1.0),
                row("b", "u2", 1, 1.0),
                row("b", "u1", 1, 2.0),
            ],
            &live(&["a", "b"]),
        );
        let c = view.apply(Vec::new(), &live(&["a"]));
        assert_eq!(names(&c.left), ["u2:0"], "u1 is still on a");
        assert_eq!(view.users("t1").len(), 1);
        // b rewrites everything when it is back.
        let c = view.apply(vec![row("b", "u2", 1, 1.0)], &live(&["a", "b"]));
        assert_eq!(names(&c.joined), ["u2:1"]);
        assert!(view.users("t2").is_empty(), "another tenant sees nobody");
    }

    #[test]
    fn local_counts_are_written_once_and_leaves_only_after_the_grace() {
        let mut config = Config::default();
        config.presence.leave_grace_ms = 1_000;
        let p = Presence::new(&config);
        let t0 = Instant::now();
        p.joined("t1", "u1", Some("staff"));
        p.joined("t1", "u1", Some("staff"));
        let due = p.due(t0, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].connections, 2);
        assert!(p.due(t0, false).is_empty(), "nothing changed");
        // A reload: the last connection goes and comes back within the grace.
        p.left("t1", "u1");
        p.left("t1", "u1");
        assert!(p.due(Instant::now(), false).is_empty(), "within the grace");
        p.joined("t1", "u1", Some("staff"));
        let due = p.due(Instant::now(), false);
        assert_eq!(due[0].connections, 1, "one connection now, no leave");
        p.left("t1", "u1");
        let later = Instant::now() + Duration::from_millis(1_500);
        let due = p.due(later, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].connections, 0, "gone after the grace");
        assert!(p.due(later, true).is_empty(), "forgotten");
        // A user that never got written leaves nothing to write.
        p.joined("t1", "u2", None);
        p.left("t1", "u2");
        assert!(p.due(later + Duration::from_secs(5), false).is_empty());
    }
}
