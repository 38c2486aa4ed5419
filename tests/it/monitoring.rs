//! deploy/components/monitoring: the alerts pass `promtool check rules` and
//! their unit tests (`promtool test rules`, one test per alert), and the
//! alerts and the dashboard ask only for metrics the service exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const COMPONENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/components/monitoring");

fn read_yaml(path: &str) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read")).expect("YAML")
}

/// `fn_image_resolver_*` names an expression uses, as their families
/// (`_total`, `_bucket`, `_count`, `_sum` taken off).
fn metrics_in(expr: &str, into: &mut BTreeSet<String>) {
    let re = regex::Regex::new(r"fn_image_resolver_[a-z_]+").expect("regex");
    for m in re.find_iter(expr) {
        let name = m.as_str();
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        into.insert(family.to_string());
    }
}

#[test]
fn the_alerts_pass_promtool_and_their_unit_tests() {
    let rule = read_yaml(&format!("{COMPONENT}/prometheusrule.yaml"));
    assert_eq!(rule["kind"], "PrometheusRule");
    let groups = rule["spec"]["groups"].clone();
    let alerts: Vec<&str> = groups[0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for r in groups[0]["rules"].as_array().expect("rules") {
        assert!(
            r["annotations"]["runbook"]
                .as_str()
                .is_some_and(|s| s.len() > 40),
            "a runbook line for {}",
            r["alert"]
        );
    }
    // promtool reads Prometheus rule files; JSON is YAML.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_json::to_string(&serde_json::json!({"groups": groups})).expect("json"),
    )
    .expect("write");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/monitoring/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml")).expect("copy");
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = promtool(&["check", "rules", "rules.yaml"]);
    assert!(ok, "{text}");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(ok, "{text}");
    // Every alert has a unit test of its own.
    let tested = std::fs::read_to_string(&tests).expect("read");
    for alert in alerts {
        assert!(
            tested.contains(&format!("alertname: {alert}")),
            "no test for {alert}"
        );
    }
}

#[test]
fn alerts_and_dashboard_ask_for_metrics_the_service_exports() {
    let metrics = every_family_once();
    let exported: BTreeSet<String> = metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let mut used = BTreeSet::new();
    let rule = read_yaml(&format!("{COMPONENT}/prometheusrule.yaml"));
    for r in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
    {
        metrics_in(r["expr"].as_str().expect("expr"), &mut used);
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{COMPONENT}/dashboard.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            metrics_in(target["expr"].as_str().expect("expr"), &mut used);
        }
    }
    assert!(used.len() > 10, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?} (exported: {exported:?})"
    );

    // The dashboard reaches Grafana's sidecar: a ConfigMap, labelled, key *.json.
    let out = Command::new("kubectl")
        .args(["kustomize", COMPONENT])
        .output()
        .expect("kubectl");
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rendered.contains("grafana_dashboard: \"1\"")
            && rendered.contains("fn-image-resolver.json: |"),
        "{rendered}"
    );
}

/// Metrics with every family used once, so that each is in the text (an
/// empty family is not).
pub fn every_family_once() -> std::sync::Arc<fn_image_resolver::metrics::Metrics> {
    use fn_image_resolver::registry::client::{RequestKind, RequestObserver as _};
    let metrics = fn_image_resolver::metrics::Metrics::new();
    let d = std::time::Duration::from_millis(1);
    metrics.observe("r.example.com", RequestKind::Manifest, Some(200), d);
    metrics.rate_limit("r.example.com", Some(100), Some(90));
    metrics.cache_lookup("hit");
    metrics.cache_revalidation("refreshed");
    metrics.secret_sync("unchanged");
    metrics.secret_synced_now();
    metrics.secret_propagation(d);
    metrics.admission_review("patched");
    metrics.admission_unpinned("deadline");
    metrics.admission_entrypoints_replaced(1);
    metrics.prewarm("cached");
    metrics.handler_panic("/mutate");
    metrics.token_review("allowed");
    metrics.http_request("/mutate", "200", d);
    metrics.serving_certificate_write("created");
    metrics.configure_registries(["r.example.com".to_string()]);
    drop(metrics.request_started());
    metrics
}
