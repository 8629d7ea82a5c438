//! Tenants of tables watched without a tenant column (`[[resolvers]]` in the config).

use super::Context;
use crate::db::DbError;
use crate::delivery::hub::Audience;

/// Entries kept per daemon before the resolver cache starts over.
const RESOLVER_CACHE_MAX: usize = 10_000;

/// Finds tenants for events of tables watched without a tenant column (`[[resolvers]]`),
/// and writes them back to the log so that replay finds them too.
#[derive(Default)]
pub struct Resolver {
    cache: std::collections::HashMap<(String, String), Option<String>>,
}

impl Resolver {
    /// Resolves the events whose tenant is empty; drops those it cannot resolve.
    pub(crate) async fn resolve(
        &mut self,
        shared: &Context,
        events: &mut Vec<crate::delivery::hub::LogEvent>,
    ) -> Result<(), DbError> {
        let mut ids: Vec<i64> = Vec::new();
        let mut tenants: Vec<String> = Vec::new();
        for ev in events
            .iter_mut()
            .filter(|e| e.audience == Audience::Unresolved)
        {
            let data: serde_json::Value =
                serde_json::from_str(ev.data.as_deref().unwrap_or("{}")).unwrap_or_default();
            let table = data["table"].as_str().unwrap_or_default().to_string();
            let Some(resolver) = shared.config.resolvers.iter().find(|r| r.table == table) else {
                tracing::debug!(table = %table, id = ev.id, "no [[resolvers]] entry for this table");
                continue;
            };
            let row = if data["row"].is_object() {
                &data["row"]
            } else {
                &data["old"]
            };
            let key = match &row[&resolver.key] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            let cache_key = (table, key);
            let tenant = match self.cache.get(&cache_key) {
                Some(t) => t.clone(),
                None => {
                    let client = shared.pool.get().await?;
                    let stmt = client
                        .prepare_typed_cached(&resolver.query, &[tokio_postgres::types::Type::TEXT])
                        .await?;
                    let found = client
                        .query_opt(&stmt, &[&cache_key.1])
                        .await?
                        .and_then(|row| {
                            row.try_get::<_, String>(0)
                                .ok()
                                .or_else(|| row.try_get::<_, i64>(0).ok().map(|n| n.to_string()))
                                .or_else(|| row.try_get::<_, i32>(0).ok().map(|n| n.to_string()))
                        });
                    if self.cache.len() >= RESOLVER_CACHE_MAX {
                        self.cache.clear();
                    }
                    self.cache.insert(cache_key, found.clone());
                    found
                }
            };
            if let Some(t) = tenant.filter(|t| !t.is_empty()) {
                ids.push(ev.id);
                tenants.push(t.clone());
                ev.audience = Audience::Tenant(t);
            }
        }
        events.retain(|e| e.audience != Audience::Unresolved);
        if !ids.is_empty() {
            let client = shared.pool.get().await?;
            client
                .execute(
                    "UPDATE citapulse.events e SET tenant = r.t FROM unnest($1::bigint[], $2::text[]) AS r(id, t) \
                      WHERE e.id = r.id",
                    &[&ids, &tenants],
                )
                .await?;
        }
        Ok(())
    }
}
