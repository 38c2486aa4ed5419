//! The `fn-image-resolver` binary, run as a user would.

use std::process::Command;

use serde_json::Value;

use crate::PlainEnv;

const BIN: &str = env!("CARGO_BIN_EXE_fn-image-resolver");

fn lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[tokio::test]
async fn resolve_prints_one_json_line_per_image_and_fails_if_any_failed() {
    let env = PlainEnv::start().await;
    let good = env.image("fns/set-namespace:v0.4");
    let missing = env.image("fns/set-namespace:nope");
    let out = tokio::process::Command::new(BIN)
        .args([
            "resolve",
            "--insecure-registry",
            &env.proxy.host,
            &good,
            &missing,
            "Not/A/Ref",
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = lines(&out.stdout);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["image"], good.as_str());
    assert_eq!(lines[0]["digest"], env.samples.entrypoint.digest.as_str());
    assert_eq!(
        lines[0]["pinned"],
        format!("{good}@{}", env.samples.entrypoint.digest).as_str()
    );
    assert_eq!(
        lines[0]["entrypoint"],
        serde_json::json!(["/usr/local/bin/function"])
    );
    assert_eq!(lines[0]["cmd"], serde_json::json!([]));
    assert_eq!(lines[0]["platform"], "linux/amd64");
    assert_eq!(lines[0]["registry"], env.proxy.host.as_str());
    assert_eq!(lines[0]["pullSecret"], Value::Null);
    assert_eq!(lines[1]["error"]["kind"], "not-found");
    assert!(
        lines[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&missing))
    );
    assert_eq!(lines[2]["error"]["kind"], "invalid-reference");
    assert_eq!(lines[2]["image"], "Not/A/Ref");
}

#[tokio::test]
async fn every_flag_is_settable_from_the_environment() {
    let env = PlainEnv::start().await;
    let out = tokio::process::Command::new(BIN)
        .args(["resolve", &env.image("fns/multi-arch:v1")])
        .env("FN_IMAGE_RESOLVER_INSECURE_REGISTRY", &env.proxy.host)
        .env("FN_IMAGE_RESOLVER_PLATFORM", "linux/arm64")
        .output()
        .await
        .expect("run");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = lines(&out.stdout);
    assert_eq!(lines[0]["entrypoint"], serde_json::json!(["/fn-arm64"]));
    assert_eq!(lines[0]["digest"], env.samples.multi.digest.as_str());
}

/// Every environment variable of subcommand `name`'s flags, set to the
/// flag's default value (from the clap command itself, so a new flag is
/// covered without touching this test).
fn every_env_var_at_its_default(name: &str) -> Vec<(String, String)> {
    use clap::CommandFactory as _;
    let cli = fn_image_resolver::cli::Cli::command();
    let sub = cli.find_subcommand(name).expect("subcommand").clone();
    sub.get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_string();
            let value = arg
                .get_default_values()
                .iter()
                .filter_map(|v| v.to_str())
                .collect::<Vec<_>>()
                .join(",");
            Some((env, value))
        })
        .filter(|(_, value)| !value.is_empty())
        .collect()
}

#[tokio::test]
async fn every_flag_read_from_the_environment_at_its_default_changes_nothing() {
    let env = PlainEnv::start().await;
    for (args, name) in [
        (vec!["register", "--print"], "register"),
        (
            vec!["resolve", &env.image("fns/set-namespace:v0.4")],
            "resolve",
        ),
    ] {
        let run = |vars: Vec<(String, String)>| {
            let mut command = tokio::process::Command::new(BIN);
            command
                .args(&args)
                .env("FN_IMAGE_RESOLVER_INSECURE_REGISTRY", &env.proxy.host);
            for (k, v) in vars {
                command.env(k, v);
            }
            async move { command.output().await.expect("run") }
        };
        let vars = every_env_var_at_its_default(name);
        assert!(vars.len() > 10, "{name}: {vars:?}");
        let plain = run(Vec::new()).await;
        let from_env = run(vars.clone()).await;
        assert!(
            plain.status.success() && from_env.status.success(),
            "{name} with {vars:?}: {}{}",
            String::from_utf8_lossy(&from_env.stdout),
            String::from_utf8_lossy(&from_env.stderr)
        );
        assert_eq!(plain.stdout, from_env.stdout, "{name}");
    }
}

#[test]
fn help_lists_the_seed_flags_with_their_env_vars() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--enable-private-registries",
        "--registry-auth-secret-path",
        "--registry-auth-secret-name",
        "--enable-private-registries-tls",
        "--tls-secret-path",
        "--pod-namespace",
        "--platform",
        "--default-image-prefix",
        "--insecure-registry",
        "/var/tmp/auth-secret/.dockerconfigjson",
        "FN_IMAGE_RESOLVER_ENABLE_PRIVATE_REGISTRIES",
    ] {
        // As a flag of its own (a line starting with it), not a mention.
        let declared = help.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with(flag)
                || l.starts_with(&format!("[env: {flag}"))
                || (!flag.starts_with("--") && l.contains(flag))
        });
        assert!(declared, "missing {flag} in:\n{help}");
    }
}

#[test]
fn a_broken_docker_config_is_a_clear_error_without_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(".dockerconfigjson");
    std::fs::write(&path, "{\"auths\": {\"r.io\": {\"password\": TOPSECRET}}}").expect("write");
    let out = Command::new(BIN)
        .args(["resolve", "--enable-private-registry=true", "r.io/fns/x:v1"])
        .arg(format!("--registry-auth-secret-path={}", path.display()))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("TOPSECRET") && out.stdout.is_empty(),
        "{stderr}"
    );
}

#[test]
fn the_static_webhook_manifest_is_what_register_builds() {
    let out = Command::new(BIN)
        .args(["register", "--print"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/webhook-config/base/mutatingwebhookconfiguration.yaml"
    );
    let stat: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read")).expect("YAML");
    assert_eq!(stat, built);
    assert_eq!(
        built["webhooks"][0]["objectSelector"],
        serde_json::json!({"matchExpressions": [{"key": "fn.kpt.dev/image", "operator": "Exists"}]})
    );

    // The cert-manager variant is the same webhook, plus the CA injection.
    let variant = Command::new("kubectl")
        .args([
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/webhook-config/cert-manager"),
        ])
        .output()
        .expect("kubectl kustomize");
    assert!(
        variant.status.success(),
        "{}",
        String::from_utf8_lossy(&variant.stderr)
    );
    let docs = String::from_utf8_lossy(&variant.stdout);
    let webhook: Value = docs
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("YAML"))
        .find(|doc| doc["kind"] == "MutatingWebhookConfiguration")
        .expect("the webhook configuration");
    assert_eq!(webhook["webhooks"], built["webhooks"]);

    // --function-pod-label changes the selector.
    let out = Command::new(BIN)
        .args([
            "register",
            "--print",
            "--function-pod-label",
            "example.com/fn",
        ])
        .output()
        .expect("run");
    let built: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        built["webhooks"][0]["objectSelector"]["matchExpressions"][0]["key"],
        "example.com/fn"
    );
}

#[test]
fn certs_writes_a_ca_and_a_serving_certificate_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let run = |force: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "certs",
            "--service",
            "fnir",
            "--namespace",
            "porch-system",
            "--san",
            "127.0.0.1",
            "--out",
        ])
        .arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().expect("run")
    };
    let first = run(false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("tls.crt", 0o644),
        ("tls.key", 0o600),
    ] {
        let meta = std::fs::metadata(out.join(file)).expect(file);
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let again = run(false);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(run(true).status.success());
    let cert = fn_image_resolver::server::tls::load_certified_key(
        &out.join("tls.crt"),
        &out.join("tls.key"),
    );
    assert!(cert.is_ok(), "the pair loads as a serving certificate");
}

#[test]
fn the_deployment_gives_the_shutdown_delay_and_drain_time_to_finish() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/deployment.yaml");
    let deployment: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read")).expect("YAML");
    let pod = &deployment["spec"]["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let seconds = |flag: &str| {
        let value = args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("deploy/ sets {flag}"));
        humantime::parse_duration(value)
            .expect("duration")
            .as_secs()
    };
    let needed = seconds("--shutdown-delay") + seconds("--shutdown-timeout");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace >= needed + 5,
        "terminationGracePeriodSeconds {grace} leaves no margin over delay + drain ({needed} s)"
    );
}

/// docs/configuration.md is what the command-line definition says; when a
/// flag is added, renamed or changed, this fails until the page is made
/// again.
#[test]
fn the_configuration_reference_is_what_help_says() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let made = fn_image_resolver::cli::reference::markdown();
    assert!(
        page == made,
        "docs/configuration.md is out of date: run `cargo run --example config_reference > docs/configuration.md`"
    );
    // And it lists every long flag --help shows, of every subcommand.
    for sub in [
        "resolve",
        "serve",
        "certs",
        "register",
        "unregister",
        "check",
    ] {
        let out = Command::new(BIN)
            .args([sub, "--help"])
            .output()
            .expect("run");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim_start();
            if let Some(rest) = line.strip_prefix("--") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if name != "help" && name != "version" {
                    assert!(
                        page.contains(&format!("`--{name}")),
                        "{sub} --{name} is not in docs/configuration.md"
                    );
                }
            }
        }
    }
}
