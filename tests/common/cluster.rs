//! The single-node cluster of tests/cluster/up.sh (kubelet, containerd,
//! runc, kube-proxy, CoreDNS and a registry, inside a network namespace of
//! its own), and running a test inside that namespace.
//!
//! Pod and Service addresses exist only in the cluster's namespace, so a
//! node test runs there: [`enter`] re-runs the current test binary, with
//! just that test, through `$CLUSTER_EXEC`, and the copy inside does the
//! work with the same helpers as every other test (registries, pushes, the
//! API server) on addresses the node and its pods reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Set in the copy of the test binary that runs inside the namespace.
const INSIDE: &str = "FNIR_INSIDE_CLUSTER";

/// What tests/cluster/up.sh prints.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
    /// `$CLUSTER_EXEC`: a command prefix that runs inside the namespace.
    pub exec: Vec<String>,
    /// `host:port` of the plain-HTTP registry on the node.
    pub registry: String,
    pub node_ip: String,
    pub node_name: String,
    /// containerd's registry host configuration (`config_path`).
    pub certs_d: PathBuf,
    pub containerd: PathBuf,
    pub state: PathBuf,
}

const VARS: [&str; 8] = [
    "KUBECONFIG",
    "CLUSTER_EXEC",
    "CLUSTER_REGISTRY",
    "CLUSTER_NODE_IP",
    "CLUSTER_NODE_NAME",
    "CLUSTER_CERTS_D",
    "CLUSTER_CONTAINERD_ADDRESS",
    "CLUSTER_STATE_DIR",
];

/// The cluster: from the environment when the caller ran
/// `eval "$(tests/cluster/up.sh)"`, else from running up.sh now (it reuses
/// a cluster that is up; one it starts stays up for the next run, until
/// tests/cluster/down.sh).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let mut vars: Vec<(String, String)> = VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if vars.len() != VARS.len() || vars.iter().all(|(k, _)| k == "KUBECONFIG") {
            vars = start();
        }
        let get = |name: &str| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("tests/cluster/up.sh did not export {name}"))
        };
        Cluster {
            kubeconfig: get("KUBECONFIG").into(),
            exec: get("CLUSTER_EXEC")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            registry: get("CLUSTER_REGISTRY"),
            node_ip: get("CLUSTER_NODE_IP"),
            node_name: get("CLUSTER_NODE_NAME"),
            certs_d: get("CLUSTER_CERTS_D").into(),
            containerd: get("CLUSTER_CONTAINERD_ADDRESS").into(),
            state: get("CLUSTER_STATE_DIR").into(),
        }
    })
}

/// Runs tests/cluster/up.sh and reads the `export NAME=VALUE` lines it prints.
fn start() -> Vec<(String, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/up.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "tests/cluster/up.sh failed (it needs root; its messages are above)"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// Whether this process is the copy of the test binary inside the cluster.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Call first in a node test, with the test's full name
/// (`node::function_pod_runs`): inside the namespace it returns true and
/// the test goes on; outside it runs the test inside (one node test at a
/// time: they share the cluster's cluster-wide objects), asserts that it
/// passed, and returns false, after which the test returns.
pub fn enter(test: &str) -> bool {
    if inside() {
        super::init_crypto();
        return true;
    }
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cluster = cluster();
    let exe = std::env::current_exe().expect("the test binary's path");
    let started = Instant::now();
    let status = Command::new(&cluster.exec[0])
        .args(&cluster.exec[1..])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("CLUSTER_EXEC", cluster.exec.join(" "))
        .env("CLUSTER_REGISTRY", &cluster.registry)
        .env("CLUSTER_NODE_IP", &cluster.node_ip)
        .env("CLUSTER_NODE_NAME", &cluster.node_name)
        .env("CLUSTER_CERTS_D", &cluster.certs_d)
        .env("CLUSTER_CONTAINERD_ADDRESS", &cluster.containerd)
        .env("CLUSTER_STATE_DIR", &cluster.state)
        .status()
        .expect("run the test inside the cluster's namespace");
    assert!(
        status.success(),
        "{test} failed inside the cluster after {:?} (its output is above; the cluster's logs are in {})",
        started.elapsed(),
        cluster.state.join("logs").display()
    );
    eprintln!(
        "{test}: passed inside the cluster in {:?}",
        started.elapsed()
    );
    false
}

/// `kubectl ARGS` against the cluster (inside the namespace): success and
/// stdout, or stderr when it failed.
pub fn kubectl(args: &[&str]) -> (bool, String) {
    kubectl_with_input(args, None)
}

pub fn kubectl_with_input(args: &[&str], input: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cluster().kubeconfig)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to kubectl");
    }
    let out = child.wait_with_output().expect("kubectl output");
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    (out.status.success(), text)
}

/// `kubectl ARGS`, which must succeed; its stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let (ok, out) = kubectl(args);
    assert!(ok, "kubectl {}: {out}", args.join(" "));
    out
}

/// `kubectl apply -f -` of `yaml`, which must succeed.
pub fn apply(yaml: &str) {
    let (ok, out) = kubectl_with_input(&["apply", "-f", "-"], Some(yaml));
    assert!(ok, "kubectl apply: {out}\n{yaml}");
}

/// Polls `check` every half second until it returns `Some`, at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A client for the cluster's API server (inside the namespace).
pub async fn client() -> kube::Client {
    super::k8s::client_from(&cluster().kubeconfig).await
}

/// Writes containerd's registry host configuration for `host` (in
/// containerd's own `hosts.toml` format) so that the node pulls from it;
/// `ca_pem` makes it trusted over TLS, else it is plain HTTP. containerd
/// reads these files at each pull: no restart.
pub fn trust_registry(host: &str, ca_pem: Option<&str>) {
    let dir = cluster().certs_d.join(host);
    std::fs::create_dir_all(&dir).expect("certs.d dir");
    let toml = match ca_pem {
        Some(pem) => {
            std::fs::write(dir.join("ca.crt"), pem).expect("ca.crt");
            format!(
                "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
                dir.join("ca.crt").display()
            )
        }
        None => format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    };
    std::fs::write(dir.join("hosts.toml"), toml).expect("hosts.toml");
}

/// A directory with the programs of the cluster's test images
/// (tests/cluster/build.sh): `testbin`, which acts by the name it is run as.
pub fn testbin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        super::built_tool("FNIR_CLUSTER_BIN_DIR", "tests/cluster/build.sh").join("testbin")
    })
    .clone()
}
