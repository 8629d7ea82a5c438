//! Operators' files under `deploy/`: the Kubernetes manifests, the Prometheus rules and
//! the Grafana dashboard parse, agree with the daemon's configuration and the Dockerfile,
//! and name only metrics that the real daemon exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use citapulse::config::{Config, Secret};
use serde::Deserialize;
use serde_json::Value;
use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every file of `dir` whose name ends with `ext`, sorted.
fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *{ext} in {dir}");
    out
}

/// Every YAML document of `path`, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The Kubernetes objects of deploy/kubernetes, by `kind/name`.
fn kubernetes_objects() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for path in files("deploy/kubernetes", ".yaml") {
        for doc in yaml_docs(&path) {
            let kind = doc["kind"].as_str().expect("every document has a kind");
            assert!(
                doc["apiVersion"].is_string(),
                "{}: apiVersion",
                path.display()
            );
            if kind == "Kustomization" {
                // Every resource it lists exists.
                for r in doc["resources"].as_array().unwrap() {
                    let file = repo("deploy/kubernetes").join(r.as_str().unwrap());
                    assert!(file.exists(), "kustomization names {}", file.display());
                }
                continue;
            }
            let name = doc["metadata"]["name"].as_str().expect("metadata.name");
            let key = format!("{kind}/{name}");
            assert!(
                objects.insert(key.clone(), doc).is_none(),
                "{key} defined twice"
            );
        }
    }
    objects
}

fn str_at<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// The port number a probe or Service names (a number or a container port's name).
fn resolve_port(port: &Value, container: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_at(port, "port");
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The ConfigMap's config.toml loaded with the daemon's own loader (file ← environment),
/// with DATABASE_URL and JWT_SECRET taken from the example Secret as the pod gets them,
/// then validated as `citapulse serve` does at start.
fn configmap_config(objects: &BTreeMap<String, Value>, configmap: &str, secret: &Value) -> Config {
    let cm = &objects[&format!("ConfigMap/{configmap}")];
    let text = str_at(&cm["data"]["config.toml"], "ConfigMap data config.toml");
    let path = std::env::temp_dir().join(format!(
        "citapulse-deploy-{}-config.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    let loaded = Config::load_unvalidated(Some(&path));
    let _ = std::fs::remove_file(&path);
    let mut config = loaded.unwrap_or_else(|e| panic!("the ConfigMap's config.toml: {e}"));
    let env = &secret["stringData"];
    config.database.url = Secret::new(str_at(&env["DATABASE_URL"], "DATABASE_URL"));
    config.auth.jwt_secret = Some(Secret::new(str_at(&env["JWT_SECRET"], "JWT_SECRET")));
    config
        .validate()
        .unwrap_or_else(|e| panic!("the ConfigMap's config.toml does not validate: {e}"));
    config
}

/// The uid the Dockerfile's final stage runs as (`useradd … --uid N` then `USER`).
fn dockerfile_uid() -> u64 {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let after = text
        .split("--uid ")
        .nth(1)
        .expect("useradd --uid in the Dockerfile");
    let uid: String = after.chars().take_while(char::is_ascii_digit).collect();
    assert!(text.contains("\nUSER "), "the Dockerfile switches USER");
    uid.parse().unwrap()
}

#[test]
fn kubernetes_manifests_match_the_daemon() {
    let objects = kubernetes_objects();
    let deployment = &objects["Deployment/citapulse"];
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(spec["replicas"], 2);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], "citapulse:latest");
    assert_eq!(c["args"], serde_json::json!(["serve"]));

    // Environment: the secrets from the Secret, the config file from the ConfigMap.
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (str_at(&e["name"], "env name"), e))
        .collect();
    let secret = &objects["Secret/citapulse"];
    for key in ["DATABASE_URL", "JWT_SECRET"] {
        let r = &env[key]["valueFrom"]["secretKeyRef"];
        assert_eq!(
            r["name"], secret["metadata"]["name"],
            "{key} from the Secret"
        );
        assert_eq!(r["key"], key);
        let placeholder = str_at(&secret["stringData"][key], key);
        assert!(
            placeholder.contains("REPLACE-ME"),
            "{key} is a marked placeholder"
        );
    }
    let config_path = str_at(&env["CITAPULSE_CONFIG"]["value"], "CITAPULSE_CONFIG");
    assert_eq!(config_path, "/etc/citapulse/config.toml");
    // The ConfigMap volume is mounted so that its config.toml is that path.
    let volumes = pod["volumes"].as_array().unwrap();
    let mut configmap = None;
    for m in c["volumeMounts"].as_array().unwrap() {
        let volume = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        let Some(cm) = volume.get("configMap") else {
            continue;
        };
        let item = cm["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["key"] == "config.toml"))
            .map_or("config.toml", |i| str_at(&i["path"], "item path"));
        let mounted = format!("{}/{item}", str_at(&m["mountPath"], "mountPath"));
        if mounted == config_path {
            configmap = Some(str_at(&cm["name"], "configMap name").to_string());
        }
    }
    let configmap = configmap.expect("a ConfigMap mounted at CITAPULSE_CONFIG");
    let config = configmap_config(&objects, &configmap, secret);

    // Ports: the config's listen and admin_listen are the container's http and admin.
    let admin = config.admin_listen.expect("admin_listen is set");
    assert_eq!(admin.port(), 9090);
    assert_eq!(config.listen.port(), 8080);
    assert_eq!(resolve_port(&Value::from("http"), c), 8080);
    assert_eq!(resolve_port(&Value::from("admin"), c), 9090);

    // Probes: liveness /livez, readiness /readyz, both on admin_listen.
    let live = &c["livenessProbe"]["httpGet"];
    let ready = &c["readinessProbe"]["httpGet"];
    assert_eq!(live["path"], "/livez");
    assert_eq!(ready["path"], "/readyz");
    assert_ne!(live["path"], ready["path"]);
    for probe in [live, ready] {
        assert_eq!(resolve_port(&probe["port"], c), u64::from(admin.port()));
    }
    if let Some(startup) = c.get("startupProbe") {
        assert_eq!(
            resolve_port(&startup["httpGet"]["port"], c),
            u64::from(admin.port())
        );
    }

    // Shutdown: the grace period covers the preStop sleep and shutdown_grace_secs.
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .filter(|cmd| cmd.first() == Some(&Value::from("sleep")))
        .and_then(|cmd| cmd.get(1)?.as_str()?.parse().ok())
        .unwrap_or(0);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop + config.limits.shutdown_grace_secs,
        "terminationGracePeriodSeconds {grace} ≤ preStop {pre_stop} + shutdown_grace_secs {}",
        config.limits.shutdown_grace_secs
    );

    // Security: non-root as the image's user, read-only root filesystem, resources.
    let uid = dockerfile_uid();
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], uid);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Services: the public one carries 8080 only; the metrics one the admin port.
    let public = &objects["Service/citapulse"]["spec"];
    assert_eq!(&public["selector"], labels);
    let ports = public["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "the public Service has one port");
    assert_eq!(ports[0]["port"], 8080);
    assert_eq!(resolve_port(&ports[0]["targetPort"], c), 8080);
    let metrics = &objects["Service/citapulse-metrics"];
    assert_eq!(&metrics["spec"]["selector"], labels);
    let mports = metrics["spec"]["ports"].as_array().unwrap();
    assert_eq!(mports.len(), 1);
    assert_eq!(resolve_port(&mports[0]["targetPort"], c), 9090);
    assert_eq!(
        metrics["metadata"]["annotations"]["prometheus.io/port"],
        "9090"
    );
    assert_eq!(
        spec["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "9090"
    );

    // The disruption budget keeps one pod of this Deployment.
    let pdb = &objects["PodDisruptionBudget/citapulse"]["spec"];
    assert_eq!(pdb["minAvailable"], 1);
    assert_eq!(&pdb["selector"]["matchLabels"], labels);
}

/// Every alerting rule of deploy/prometheus, as (name, expr).
fn alert_rules() -> Vec<(String, String)> {
    let mut rules = Vec::new();
    for path in files("deploy/prometheus", ".yml") {
        for doc in yaml_docs(&path) {
            let Some(groups) = doc.get("groups") else {
                // A scrape-configuration example.
                assert!(doc["scrape_configs"].is_array(), "{}", path.display());
                continue;
            };
            for group in groups.as_array().unwrap() {
                assert!(group["name"].is_string());
                for rule in group["rules"].as_array().unwrap() {
                    let name = str_at(&rule["alert"], "alert").to_string();
                    let expr = str_at(&rule["expr"], "expr").to_string();
                    assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
                    assert!(
                        rule["annotations"]["summary"].is_string(),
                        "{name}: summary"
                    );
                    rules.push((name, expr));
                }
            }
        }
    }
    rules
}

/// Every `citapulse_…` name in `text` (names run over `[a-z0-9_]`).
fn metric_names(text: &str, out: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("citapulse_") {
        let start = from + at;
        let mut end = start + "citapulse_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        if boundary {
            out.insert(text[start..end].to_string());
        }
        from = end;
    }
}

/// Every string anywhere in a JSON value (expressions, variable queries, descriptions).
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// A metric family's series names: a counter is `<family>_total`, a histogram
/// `<family>_bucket`, `_sum` and `_count`, a gauge `<family>`.
fn series(family: &str, kind: &str, out: &mut BTreeSet<String>) {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "summary" => &["", "_sum", "_count", "_created"],
        _ => &[""],
    };
    for s in suffixes {
        out.insert(format!("{family}{s}"));
    }
}

/// The families of an exposition, by name, with their type (from `# TYPE` lines).
fn exposed_families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|rest| {
            let mut parts = rest.split_whitespace();
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            )
        })
        .collect()
}

/// The families src/metrics.rs registers: name (with the registry's prefix) → (type,
/// whether it is a labelled `Family`). A `Family` without any label set yet has no
/// line at all in the exposition, so these are the names of record for those.
fn registered_families() -> BTreeMap<String, (String, bool)> {
    let whole = std::fs::read_to_string(repo("src/metrics.rs")).unwrap();
    // The registrations, not the unit tests below them (which mention `r.register(`).
    let src = whole.split("#[cfg(test)]").next().unwrap().to_string();
    let prefix = src
        .split("Registry::with_prefix_and_labels(")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .expect("the registry's prefix in src/metrics.rs");
    // Field types of `pub struct Metrics`.
    let body = src.split("pub struct Metrics {").nth(1).unwrap();
    let body = &body[..body.find("\n}").unwrap()];
    let fields: BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(": "))
        .map(|(name, ty)| (name, ty.trim_end_matches(',')))
        .collect();
    let mut out = BTreeMap::new();
    for call in src.split("r.register(").skip(1) {
        let name = call.split('"').nth(1).unwrap();
        let field = call
            .split("m.")
            .nth(1)
            .and_then(|f| f.split(".clone()").next())
            .unwrap();
        let ty = fields[field];
        let kind = if ty.contains("Counter") {
            "counter"
        } else if ty.contains("Histogram") {
            "histogram"
        } else {
            "gauge"
        };
        out.insert(
            format!("{prefix}_{name}"),
            (kind.to_string(), ty.starts_with("Family<")),
        );
    }
    assert!(out.len() >= 40, "{} registrations read", out.len());
    out
}

fn unknown<'a>(used: &'a BTreeSet<String>, exposed: &BTreeSet<String>) -> Vec<&'a String> {
    used.iter().filter(|n| !exposed.contains(*n)).collect()
}

#[tokio::test]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    // The dashboard.
    let path = repo("deploy/grafana/citapulse.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let mut texts = Vec::new();
    strings(&dashboard, &mut texts);
    let mut in_dashboard = BTreeSet::new();
    for t in &texts {
        metric_names(t, &mut in_dashboard);
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let exprs = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| t["expr"].is_string())
        .count();
    assert!(exprs >= 20, "{exprs} panel queries");

    // The alert rules.
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), rules.len(), "alert names are unique");
    let mut in_alerts = BTreeSet::new();
    for (_, expr) in &rules {
        metric_names(expr, &mut in_alerts);
    }

    // What the brief asks each to cover.
    for family in [
        "citapulse_connections",
        "citapulse_subscriptions",
        "citapulse_events_read_total",
        "citapulse_messages_sent_total",
        "citapulse_stats_queries_total",
        "citapulse_connections_closed_total",
        "citapulse_handshakes_refused_total",
        "citapulse_capture_lag_bytes",
        "citapulse_wal_streaming",
        "citapulse_wakeup_mode",
        "citapulse_runtime_stall_seconds",
        "citapulse_database_tls",
        "citapulse_tcp_connections",
        "citapulse_tcp_refused_total",
        "citapulse_log_rows",
        "citapulse_oversized_tenant_rows",
        "citapulse_reminders_sent_total",
        "citapulse_enrich_lookups_total",
    ] {
        assert!(in_dashboard.contains(family), "no panel shows {family}");
    }
    for family in [
        "citapulse_listener_up",
        "citapulse_capture_lag_bytes",
        "citapulse_connections_closed_total",
        "citapulse_runtime_stall_seconds",
        "citapulse_tcp_connections_max",
        "citapulse_database_tls",
        "citapulse_oversized_tenant_rows",
    ] {
        assert!(in_alerts.contains(family), "no alert uses {family}");
    }

    // The real exposition, from admin_listen as deployed.
    let db = TestDb::new().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(&db.url, |c| c.admin_listen = Some(admin)).await;
    assert_eq!(http_get(d.ops, "/livez", &[]).await.0, 200);
    assert_eq!(http_get(d.ops, "/readyz", &[]).await.0, 200);
    // Give the labelled families a label set where that is cheap: a subscription by
    // kind, a client error, a closed socket, a refused handshake.
    let mut ws = WsClient::subscribed(d.addr, "t-deploy").await;
    ws.send(serde_json::json!({"type": "no_such_type"})).await;
    ws.expect_type("error").await;
    ws.close().await;
    let (refused, _) = http_get(d.addr, "/ws", &[]).await;
    assert_ne!(refused, 101);
    wait_until(|| async {
        http_get(d.ops, "/metrics", &[])
            .await
            .1
            .contains("citapulse_connections_closed_total{")
    })
    .await;
    let (status, exposition) = http_get(d.ops, "/metrics", &[]).await;
    assert_eq!(status, 200);
    d.stop().await;

    // What the exposition shows agrees with the registrations in src/metrics.rs, and
    // only labelled families may still be missing from it.
    let exposed = exposed_families(&exposition);
    let registered = registered_families();
    for (family, kind) in &exposed {
        let (reg_kind, _) = registered
            .get(family)
            .unwrap_or_else(|| panic!("{family} exported but not read from src/metrics.rs"));
        assert_eq!(reg_kind, kind, "{family}");
    }
    let mut unseen = Vec::new();
    for (family, (_, labelled)) in &registered {
        if !exposed.contains_key(family) {
            assert!(labelled, "{family} is registered but not exported");
            unseen.push(family.as_str());
        }
    }
    eprintln!("labelled families with no label set yet (names from src/metrics.rs): {unseen:?}");
    let mut exposed_series = BTreeSet::new();
    for (family, (kind, _)) in &registered {
        series(family, kind, &mut exposed_series);
    }
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        if end > 0 {
            assert!(
                exposed_series.contains(&line[..end]),
                "sample {} of no known family",
                &line[..end]
            );
        }
    }
    let exposed = exposed_series;

    // The check itself catches a wrong name and a counter queried without `_total`.
    for wrong in [
        "citapulse_connection",
        "citapulse_events_read",
        "citapulse_listener_up_total",
    ] {
        let probe = BTreeSet::from([wrong.to_string()]);
        assert_eq!(
            unknown(&probe, &exposed).len(),
            1,
            "{wrong} passes the check"
        );
    }
    assert!(exposed.contains("citapulse_delivery_lag_seconds_bucket"));

    let bad = unknown(&in_dashboard, &exposed);
    assert!(
        bad.is_empty(),
        "deploy/grafana/citapulse.json names metrics /metrics does not export: {bad:?}"
    );
    let bad = unknown(&in_alerts, &exposed);
    assert!(
        bad.is_empty(),
        "deploy/prometheus alert rules name metrics /metrics does not export: {bad:?}"
    );
    // The alerts' annotations may name metrics too.
    let mut in_rule_files = BTreeSet::new();
    for path in files("deploy/prometheus", ".yml") {
        let docs = yaml_docs(&path);
        let mut all = Vec::new();
        for doc in &docs {
            strings(doc, &mut all);
        }
        for s in all {
            metric_names(s, &mut in_rule_files);
        }
    }
    let bad = unknown(&in_rule_files, &exposed);
    assert!(bad.is_empty(), "deploy/prometheus names {bad:?}");
}
