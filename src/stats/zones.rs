//! Per-tenant time zones (DESIGN.md §9): which zone a tenant lives in
//! (`tenants.timezone_query`, cached for `tenants.cache_ttl_secs`; `stats.timezone`
//! otherwise or when the zone is unknown) and what "today" is there.
//!
//! Dates come from PostgreSQL's own time zone database (`now() AT TIME ZONE`), so the
//! daemon needs none, and every instance agrees with the database's clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::Config;
use crate::db::DbError;
use crate::sync::lock;

/// Tenants' zones and each zone's date.
pub struct Zones {
    default: String,
    query: Option<String>,
    ttl: Duration,
    offset_secs: i64,
    by_tenant: Mutex<HashMap<Arc<str>, (String, Instant)>>,
    days: Mutex<HashMap<String, String>>,
    reported: Mutex<HashSet<String>>,
    /// A zone not seen before: the rollover task must time its midnight too.
    pub new_zone: tokio::sync::Notify,
}

impl Zones {
    /// As configured; `default_today` is today in `stats.timezone` (checked at start-up).
    pub fn new(config: &Config, default_today: String) -> Self {
        let default = config.stats.timezone.clone();
        Self {
            days: Mutex::new(HashMap::from([(default.clone(), default_today)])),
            default,
            query: config.tenants.timezone_query.clone(),
            ttl: Duration::from_secs(config.tenants.cache_ttl_secs),
            offset_secs: config.stats.clock_offset_secs,
            by_tenant: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
            new_zone: tokio::sync::Notify::new(),
        }
    }

    /// The default zone (`stats.timezone`).
    pub fn default_zone(&self) -> &str {
        &self.default
    }

    /// A tenant's zone: cached, else asked with `tenants.timezone_query`. A failing
    /// query, no row, NULL or a zone PostgreSQL does not know give the default (and a
    /// warning, once per zone or error).
    pub async fn zone_of(&self, client: &Client, tenant: &Arc<str>) -> String {
        let Some(query) = &self.query else {
            return self.default.clone();
        };
        if let Some((zone, at)) = lock(&self.by_tenant).get(tenant)
            && at.elapsed() < self.ttl
        {
            return zone.clone();
        }
        let asked = client.query_opt(query.as_str(), &[&&**tenant]).await;
        let zone = match asked {
            Ok(Some(row)) => match row.try_get::<_, Option<String>>(0) {
                Ok(Some(zone)) if !zone.trim().is_empty() => zone,
                _ => self.default.clone(),
            },
            Ok(None) => self.default.clone(),
            Err(err) => {
                self.report_once("query", || {
                    tracing::warn!(error = %err, "tenants.timezone_query failed; using stats.timezone");
                });
                self.default.clone()
            }
        };
        let zone = if zone == self.default || lock(&self.days).contains_key(&zone) {
            zone
        } else {
            match today_in_zone(client, &zone, self.offset_secs).await {
                Ok((today, _)) => {
                    lock(&self.days).insert(zone.clone(), today);
                    zone
                }
                Err(_) => {
                    self.report_once(&zone, || {
                        tracing::warn!(zone = %zone, tenant = %tenant, "unknown time zone from tenants.timezone_query; using stats.timezone");
                    });
                    self.default.clone()
                }
            }
        };
        let before = lock(&self.by_tenant).insert(tenant.clone(), (zone.clone(), Instant::now()));
        // The rollover task times the midnights of the zones it knows tenants of.
        if before.is_none_or(|(z, _)| z != zone) {
            self.new_zone.notify_one();
        }
        zone
    }

    fn report_once(&self, key: &str, report: impl FnOnce()) {
        if lock(&self.reported).insert(key.to_string()) {
            report();
        }
    }

    /// Today in a tenant's zone (asking the database for a zone not seen yet).
    pub async fn today_of(&self, client: &Client, tenant: &Arc<str>) -> Result<String, DbError> {
        let zone = self.zone_of(client, tenant).await;
        if let Some(today) = lock(&self.days).get(&zone) {
            return Ok(today.clone());
        }
        let (today, _) = today_in_zone(client, &zone, self.offset_secs).await?;
        lock(&self.days).insert(zone, today.clone());
        Ok(today)
    }

    /// Today in a tenant's zone as last known, without asking (the default zone's for
    /// a tenant not looked up yet).
    pub fn cached_today(&self, tenant: &str) -> Option<String> {
        let zone = lock(&self.by_tenant)
            .get(tenant)
            .map(|(z, _)| z.clone())
            .unwrap_or_else(|| self.default.clone());
        lock(&self.days).get(&zone).cloned()
    }

    /// Every zone known (each has a date to keep current), with those of these tenants
    /// that live in it (as cached).
    pub fn group(&self, tenants: &[Arc<str>]) -> HashMap<String, Vec<Arc<str>>> {
        let mut out: HashMap<String, Vec<Arc<str>>> = lock(&self.days)
            .keys()
            .map(|z| (z.clone(), Vec::new()))
            .collect();
        let by_tenant = lock(&self.by_tenant);
        out.entry(self.default.clone()).or_default();
        for t in tenants {
            let zone = by_tenant
                .get(t)
                .map(|(z, _)| z.clone())
                .unwrap_or_else(|| self.default.clone());
            out.entry(zone).or_default().push(t.clone());
        }
        out
    }

    /// Records a zone's date; true if it changed from a known earlier one (a new day).
    pub fn set_today(&self, zone: &str, today: &str) -> bool {
        let mut days = lock(&self.days);
        match days.insert(zone.to_string(), today.to_string()) {
            Some(before) => before != today,
            None => false,
        }
    }

    /// The clock shift of `stats.clock_offset_secs`.
    pub fn offset_secs(&self) -> i64 {
        self.offset_secs
    }
}

/// Today's date in `tz` and the seconds until it changes, from the database clock
/// (shifted by `offset_secs`).
pub async fn today_in_zone(
    client: &Client,
    tz: &str,
    offset_secs: i64,
) -> Result<(String, f64), DbError> {
    let row = client
        .query_one(
            "WITH n AS (SELECT (now() + make_interval(secs => $2::float8)) AT TIME ZONE $1 AS local) \
             SELECT local::date::text, \
                    extract(epoch FROM (date_trunc('day', local) + interval '1 day' - local))::float8 \
               FROM n",
            &[&tz, &(offset_secs as f64)],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
