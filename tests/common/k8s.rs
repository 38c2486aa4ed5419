//! A real control plane for the end-to-end tests: etcd and kube-apiserver,
//! built from the pinned Go modules in tests/k8s (tests/k8s/build.sh, cached
//! outside the repo), started on loopback ports with a temp dir, and stopped
//! on drop, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "fnir-admin-token";
pub const USER_TOKEN: &str = "fnir-unprivileged-token";
pub const USER_NAME: &str = "unprivileged";

/// Where the binaries are: $FNIR_K8S_BIN_DIR, else whatever build.sh builds
/// or finds in its cache (the first run on a machine takes minutes).
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| super::built_tool("FNIR_K8S_BIN_DIR", "tests/k8s/build.sh"))
        .clone()
}

/// A running etcd + kube-apiserver.
#[derive(Debug)]
pub struct ControlPlane {
    etcd: Option<Child>,
    apiserver: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    etcd_port: u16,
    /// PEM of the API server's self-signed serving certificate.
    pub ca_pem: String,
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl ControlPlane {
    pub fn start() -> Self {
        let bins = bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let etcd_port = super::free_port();
        let peer_port = super::free_port();
        let etcd = spawn(
            &bins.join("etcd"),
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--name=default".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &d.join("etcd.log"),
        );
        // Service-account signing key (ECDSA P-256) and the static tokens.
        let sa = rcgen::KeyPair::generate().expect("sa key");
        std::fs::write(d.join("sa.key"), sa.serialize_pem()).expect("sa.key");
        std::fs::write(d.join("sa.pub"), sa.public_key_pem()).expect("sa.pub");
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n{USER_TOKEN},{USER_NAME},2\n"),
        )
        .expect("tokens");
        let mut plane = Self {
            etcd: Some(etcd),
            apiserver: None,
            port: super::free_port(),
            etcd_port,
            ca_pem: String::new(),
            dir,
        };
        plane.start_apiserver();
        plane
    }

    fn start_apiserver(&mut self) {
        let d = self.dir.path();
        let apiserver = spawn(
            &bin_dir().join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                format!("--cert-dir={}", d.join("certs").display()),
                format!("--secure-port={}", self.port),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", d.join("sa.pub").display()),
                format!(
                    "--service-account-signing-key-file={}",
                    d.join("sa.key").display()
                ),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--enable-priority-and-fairness=false".into(),
                "--v=0".into(),
            ],
            &d.join("apiserver.log"),
        );
        self.apiserver = Some(apiserver);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let cert_path = self.dir.path().join("certs/apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(c) = self.apiserver.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("kube-apiserver exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(pem) = std::fs::read_to_string(&cert_path) {
                self.ca_pem = pem;
                let ok = Command::new("curl")
                    .args(["-sf", "--max-time", "2", "--cacert"])
                    .arg(&cert_path)
                    .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                    .arg(format!("https://127.0.0.1:{}/readyz", self.port))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("kube-apiserver not ready within 90s:\n{}", self.log_tail());
    }

    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops and starts the API server (etcd keeps the data).
    pub fn restart_apiserver(&mut self) {
        kill(&mut self.apiserver);
        self.start_apiserver();
    }

    pub fn stop_apiserver(&mut self) {
        kill(&mut self.apiserver);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, token: &str, name: &str) -> PathBuf {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(&path, yaml).expect("kubeconfig");
        path
    }

    /// A kubeconfig that acts as `user` in `groups` (admin impersonation),
    /// e.g. a ServiceAccount, to prove what its RBAC allows.
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> PathBuf {
        let admin =
            std::fs::read_to_string(self.kubeconfig(ADMIN_TOKEN, "admin")).expect("kubeconfig");
        let groups: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        let with_as = admin.replace(
            &format!("    token: {ADMIN_TOKEN}\n"),
            &format!(
                "    token: {ADMIN_TOKEN}\n    as: {user}\n    as-groups: [{}]\n",
                groups.join(", ")
            ),
        );
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-as-{}", user.replace(':', "_")));
        std::fs::write(&path, with_as).expect("kubeconfig");
        path
    }

    /// A client for `token`.
    pub async fn client_for(&self, token: &str, name: &str) -> kube::Client {
        client_from(&self.kubeconfig(token, name)).await
    }

    /// Creates namespace `name` with its `default` ServiceAccount, which the
    /// ServiceAccount admission plugin needs for every pod (in a real
    /// cluster the controller-manager makes it; none runs here).
    pub async fn create_namespace(&self, name: &str) {
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        let admin = self.admin().await;
        let api: kube::Api<Namespace> = kube::Api::all(admin.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_string());
        api.create(&Default::default(), &ns)
            .await
            .expect("create namespace");
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(admin, name);
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some("default".into());
        accounts
            .create(&Default::default(), &sa)
            .await
            .expect("create the default ServiceAccount");
    }

    pub async fn admin(&self) -> kube::Client {
        self.client_for(ADMIN_TOKEN, "admin").await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        kill(&mut self.apiserver);
        kill(&mut self.etcd);
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

/// Polls (every 2 ms, at most 10 s) until Secret `name` holds `want` under
/// `.dockerconfigjson`; returns how long that took.
pub async fn wait_for_secret_data(
    api: &kube::Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    want: &[u8],
) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(Some(s)) = api.get_opt(name).await
            && s.data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
                .map(|b| b.0.as_slice())
                == Some(want)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Secret {name} never held the expected data"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Swaps a Secret volume's content the way the kubelet does: a new
/// timestamped directory, then an atomic rename of the `..data` symlink.
/// `mount/.dockerconfigjson` must link to `..data/.dockerconfigjson`.
pub fn kubelet_swap(mount: &Path, content: &[u8], generation: usize) {
    kubelet_swap_files(mount, &[(".dockerconfigjson", content)], generation);
}

/// The same for a volume of several files (`tls.crt`, `tls.key`, …): every
/// file changes at once, in one rename, and each `mount/NAME` is a symlink
/// to `..data/NAME`.
pub fn kubelet_swap_files(mount: &Path, files: &[(&str, &[u8])], generation: usize) {
    let data = mount.join(format!("..2026_11_23_{generation}"));
    std::fs::create_dir(&data).expect("data dir");
    for (name, content) in files {
        std::fs::write(data.join(name), content).expect("write");
    }
    let tmp = mount.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
    for (name, _) in files {
        let file = mount.join(name);
        if std::fs::symlink_metadata(&file).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &file).expect("file link");
        }
    }
}
