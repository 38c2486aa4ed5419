//! Runs Debian's `docker-registry` (distribution 2.8) on a loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fn_image_resolver::certs::{CertificateAuthority, Issued};

/// How clients must authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// htpasswd Basic auth with one user.
    Basic {
        user: String,
        pass: String,
    },
    /// Bearer tokens from a token server whose signing cert is `root_pem`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_pem: String,
    },
}

/// A running registry; stopped (and its storage removed) on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    pub port: u16,
    /// `127.0.0.1:PORT`
    pub host: String,
    pub tls: bool,
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

pub fn binary() -> String {
    std::env::var("FNIR_DOCKER_REGISTRY").unwrap_or_else(|_| "docker-registry".into())
}

impl Registry {
    pub fn start(tls: Option<&Issued>, auth: Auth) -> Self {
        Self::start_on(super::free_port(), tls, auth, None)
    }

    /// Starts on `port`, optionally reusing a storage directory (to restart a
    /// registry with its content).
    pub fn start_on(port: u16, tls: Option<&Issued>, auth: Auth, storage: Option<&Path>) -> Self {
        Self::start_at("127.0.0.1", port, tls, auth, storage)
    }

    /// Starts on `ip:port`: on the test cluster's node address, the node
    /// and its pods reach it too.
    pub fn start_at(
        ip: &str,
        port: u16,
        tls: Option<&Issued>,
        auth: Auth,
        storage: Option<&Path>,
    ) -> Self {
        Self::start_with(ip, port, tls, auth, storage, false)
    }

    /// The same, writing an access log (one line per request, with the
    /// client's User-Agent: who asked what) when `access_log`.
    pub fn start_with(
        ip: &str,
        port: u16,
        tls: Option<&Issued>,
        auth: Auth,
        storage: Option<&Path>,
        access_log: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = storage
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("storage"));
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {ip}:{port}\n  secret: fn-image-resolver-tests\n",
            !access_log,
            storage.display()
        );
        if let Some(issued) = tls {
            std::fs::write(dir.path().join("server.crt"), &issued.cert_pem).expect("write cert");
            std::fs::write(dir.path().join("server.key"), &issued.key_pem).expect("write key");
            yaml.push_str(&format!(
                "  tls:\n    certificate: {0}/server.crt\n    key: {0}/server.key\n",
                dir.path().display()
            ));
        }
        match &auth {
            Auth::None => {}
            Auth::Basic { user, pass } => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, pass])
                    .output()
                    .expect("run htpasswd (apt-get install apache2-utils)");
                assert!(out.status.success(), "htpasswd failed");
                std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd");
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: fn-image-resolver-tests\n    path: {}/htpasswd\n",
                    dir.path().display()
                ));
            }
            Auth::Token {
                realm,
                service,
                issuer,
                root_pem,
            } => {
                std::fs::write(dir.path().join("token-root.pem"), root_pem).expect("write root");
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}/token-root.pem\n",
                    dir.path().display()
                ));
            }
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yaml).expect("write config");
        let mut registry = Self {
            child: None,
            port,
            host: format!("{ip}:{port}"),
            tls: tls.is_some(),
            dir,
            config,
        };
        registry.spawn();
        registry
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).expect("log file");
        let child = Command::new(binary())
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        wait_for_port(&self.host, self.child.as_mut());
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host
        )
    }

    /// Kills the process (the storage stays, for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_port(host: &str, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(host).is_ok() {
            return;
        }
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("docker-registry exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("docker-registry did not listen on {host} within 20s");
}

/// A CA and a serving certificate for 127.0.0.1 / localhost.
pub fn tls_pair(name: &str) -> (CertificateAuthority, Issued) {
    let ca = CertificateAuthority::generate(name).expect("generate CA");
    let issued = ca
        .issue(&["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("issue cert");
    (ca, issued)
}
