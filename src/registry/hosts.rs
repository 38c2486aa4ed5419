//! containerd's registry host configuration (`config_path`), read exactly as
//! the test node's containerd reads it (1.6.20, `remotes/docker/config`;
//! 2.x reads these files the same way): `DIR/<host>/hosts.toml`, the host's
//! port as `<host>_<port>_` or `<host>:<port>`, `DIR/_default` for every
//! host without a directory of its own, and `docker.io` for Docker Hub.
//!
//! A host's directory lists, in file order, the `[host."…"]` entries to try,
//! then the `server` (the registry itself unless it says otherwise) last.
//! Each entry has its capabilities (`pull`, `resolve`, `push`; all three
//! when not said), CA files, client certificate pairs, `skip_verify`,
//! headers sent with every request, and `override_path`. A directory
//! without a `hosts.toml` (or with one that does not parse, which containerd
//! logs and reads past) adds Docker's certificate files to the registry
//! itself: `*.crt` CAs, `*.cert` client certificates with their `*.key`.
//!
//! This module only reads; the client turns what it reads into connections.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::warn;

/// Over which protocol a host is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Https,
    /// Plain HTTP: written so in a `hosts.toml`, the operator's explicit
    /// opt-in for that host.
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http => "http",
        }
    }
}

/// One host to try for a registry, as containerd builds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostSpec {
    pub scheme: Scheme,
    /// `host[:port]`.
    pub authority: String,
    /// The API root: `/v2`, after any path the entry's URL has, or that
    /// path as written with `override_path`.
    pub path: String,
    pub pull: bool,
    pub resolve: bool,
    /// CA files added to the system roots for this host.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (`None`: the key is in the
    /// certificate's file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// `Some(true)`: the server's certificate is not verified.
    pub skip_verify: Option<bool>,
    /// Headers sent with every request to this host, in the file's order.
    pub headers: Vec<(String, String)>,
}

/// Why a registry's host configuration cannot be used (containerd then
/// fails the pull; so does a resolution).
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What was read for one registry, and how to tell that it changed.
#[derive(Debug, Clone)]
pub struct HostsFor {
    /// `None`: no directory for it (nor `_default`): no host configuration.
    pub hosts: Option<Vec<HostSpec>>,
    /// Every path looked at, with its modification time and length when it
    /// exists: when any of these differs, read again.
    pub stamp: Vec<(PathBuf, Option<(SystemTime, u64)>)>,
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Whether anything `stamp` recorded has changed since.
pub fn changed(stamp: &[(PathBuf, Option<(SystemTime, u64)>)]) -> bool {
    stamp.iter().any(|(path, seen)| stamp_of(path) != *seen)
}

/// containerd's `hostDirectory`: `host:port` → `host_port_`.
fn host_directory(host: &str) -> Option<String> {
    match host.rfind(':') {
        Some(i) if i > 0 => Some(format!("{}_{}_", &host[..i], &host[i + 1..])),
        _ => None,
    }
}

/// The directories containerd looks at for `host`, in its order.
fn host_paths(root: &Path, host: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = host_directory(host) {
        paths.push(root.join(dir));
    }
    paths.push(root.join(host));
    paths.push(root.join("_default"));
    paths
}

/// Is `host` a loopback name or address (containerd's `IsLocalhost`)?
fn is_localhost(host: &str) -> bool {
    let name = match host.rfind(':') {
        Some(i) if !host.ends_with(']') => &host[..i],
        _ => host,
    };
    let name = name.trim_matches(['[', ']']);
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The hosts to try for `registry` (its name in image references:
/// `docker.io`, `ghcr.io`, `host:port`), from the configuration under
/// `root`.
pub fn load(root: &Path, registry: &str) -> Result<HostsFor, HostsError> {
    let mut stamp = Vec::new();
    let mut dir = None;
    for candidate in host_paths(root, registry) {
        let seen = stamp_of(&candidate);
        stamp.push((candidate.clone(), seen));
        if seen.is_some() {
            dir = Some(candidate);
            break;
        }
    }
    let Some(dir) = dir else {
        return Ok(HostsFor { hosts: None, stamp });
    };
    let toml_path = dir.join("hosts.toml");
    stamp.push((toml_path.clone(), stamp_of(&toml_path)));
    let text = match std::fs::read(&toml_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(HostsError::Read {
                path: toml_path,
                source,
            });
        }
    };
    let mut hosts = if text.is_empty() {
        cert_files(&dir)?
    } else {
        match parse(&dir, &String::from_utf8_lossy(&text)) {
            Ok(hosts) => hosts,
            Err(reason) => {
                // containerd logs this and falls back to the certificate files.
                warn!(path = %toml_path.display(), error = %reason, "failed to decode hosts.toml; using the directory's certificate files, as containerd does");
                cert_files(&dir)?
            }
        }
    };
    // The last entry without a host is the registry itself.
    if let Some(last) = hosts.last_mut().filter(|h| h.authority.is_empty()) {
        if registry == "docker.io" {
            last.scheme = Scheme::Https;
            last.authority = "registry-1.docker.io".into();
        } else if is_localhost(registry) {
            last.authority = registry.to_string();
            last.scheme = Scheme::Http;
            last.skip_verify = Some(true);
        } else {
            last.authority = registry.to_string();
            last.scheme = Scheme::Https;
        }
        last.path = "/v2".into();
        (last.pull, last.resolve) = (true, true);
    }
    for host in &hosts {
        for path in host.ca.iter().chain(
            host.client
                .iter()
                .flat_map(|(c, k)| std::iter::once(c).chain(k.as_ref())),
        ) {
            stamp.push((path.clone(), stamp_of(path)));
        }
    }
    Ok(HostsFor {
        hosts: Some(hosts),
        stamp,
    })
}

/// containerd's `loadCertFiles`: the registry itself, with the directory's
/// `*.crt` as CAs and `*.cert` (+ `*.key`) as client certificates.
fn cert_files(dir: &Path) -> Result<Vec<HostSpec>, HostsError> {
    let mut host = HostSpec {
        scheme: Scheme::Https,
        authority: String::new(),
        path: String::new(),
        pull: true,
        resolve: true,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: None,
        headers: Vec::new(),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![host]),
        Err(source) => {
            return Err(HostsError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // os.ReadDir sorts by name.
    names.sort();
    for name in names {
        if name.ends_with(".crt") {
            host.ca.push(dir.join(&name));
        }
        if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            host.client
                .push((dir.join(&name), key.exists().then_some(key)));
        }
    }
    Ok(vec![host])
}

fn absolute(path: &str, base: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn strings(value: &toml::Value, what: &str) -> Result<Vec<String>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("invalid type for {what}"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("unable to cast a {} to string", v.type_str()))
        })
        .collect()
}

/// containerd's `parseHostsFile`: the `[host."…"]` entries in the order
/// they are written, then the root (`server` and the keys beside it).
pub fn parse(dir: &Path, text: &str) -> Result<Vec<HostSpec>, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("failed to parse TOML: {}", e.message()))?;
    let mut hosts = Vec::new();
    if let Some(entries) = table.get("host") {
        let entries = entries.as_table().ok_or("invalid `host` tree")?;
        // preserve_order: the entries come as written.
        for (server, entry) in entries {
            let entry = entry
                .as_table()
                .ok_or_else(|| format!("invalid `host` entry {server:?}"))?;
            hosts.push(parse_host(server, dir, entry)?);
        }
    }
    let server = match table.get("server") {
        Some(v) => v.as_str().ok_or("invalid type for \"server\"")?,
        None => "",
    };
    hosts.push(parse_host(server, dir, &table)?);
    Ok(hosts)
}

/// containerd's `parseHostConfig`.
fn parse_host(server: &str, dir: &Path, config: &toml::Table) -> Result<HostSpec, String> {
    let override_path = match config.get("override_path") {
        Some(v) => v.as_bool().ok_or("invalid type for \"override_path\"")?,
        None => false,
    };
    let mut host = HostSpec {
        scheme: Scheme::Https,
        authority: String::new(),
        path: String::new(),
        pull: true,
        resolve: true,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: None,
        headers: Vec::new(),
    };
    if !server.is_empty() {
        let full = if server.starts_with("http") {
            server.to_string()
        } else {
            format!("https://{server}")
        };
        let url =
            url::Url::parse(&full).map_err(|e| format!("unable to parse server {server}: {e}"))?;
        host.scheme = match url.scheme() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("unsupported scheme {other:?} in {server}")),
        };
        // As Go's url keeps it: the port as written, even a default one.
        host.authority = full
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
            .unwrap_or_default()
            .to_string();
        if url.host_str().is_none_or(str::is_empty) || host.authority.is_empty() {
            return Err(format!("no host in {server}"));
        }
        let path = url.path().trim_end_matches('/');
        host.path = if !path.is_empty() {
            let clean = clean_path(path);
            if !clean.ends_with("/v2") && !override_path {
                format!("{clean}/v2")
            } else {
                clean
            }
        } else if !override_path {
            "/v2".into()
        } else {
            String::new()
        };
    }
    if let Some(v) = config.get("skip_verify") {
        host.skip_verify = Some(v.as_bool().ok_or("invalid type for \"skip_verify\"")?);
    }
    if let Some(v) = config.get("capabilities") {
        let caps = strings(v, "\"capabilities\"")?;
        if !caps.is_empty() {
            (host.pull, host.resolve) = (false, false);
            for cap in caps {
                match cap.to_ascii_lowercase().as_str() {
                    "pull" => host.pull = true,
                    "resolve" => host.resolve = true,
                    "push" => {}
                    _ => return Err(format!("unknown capability {cap}")),
                }
            }
        }
    }
    match config.get("ca") {
        None => {}
        Some(toml::Value::String(file)) => host.ca.push(absolute(file, dir)),
        Some(v @ toml::Value::Array(_)) => {
            host.ca = strings(v, "\"ca\"")?
                .iter()
                .map(|f| absolute(f, dir))
                .collect();
        }
        Some(v) => return Err(format!("invalid type {} for \"ca\"", v.type_str())),
    }
    match config.get("client") {
        None => {}
        Some(toml::Value::String(file)) => host.client.push((absolute(file, dir), None)),
        Some(toml::Value::Array(items)) => {
            for item in items {
                match item {
                    toml::Value::String(file) => host.client.push((absolute(file, dir), None)),
                    toml::Value::Array(_) => {
                        let pair = strings(item, "\"client\"")?;
                        let [cert, key] = <[String; 2]>::try_from(pair)
                            .map_err(|p| format!("invalid pair {p:?} for \"client\""))?;
                        host.client.push((
                            absolute(&cert, dir),
                            (!key.is_empty()).then(|| absolute(&key, dir)),
                        ));
                    }
                    other => {
                        return Err(format!("invalid type {} for \"client\"", other.type_str()));
                    }
                }
            }
        }
        Some(v) => return Err(format!("invalid type {} for \"client\"", v.type_str())),
    }
    if let Some(headers) = config.get("header") {
        let headers = headers.as_table().ok_or("invalid type for \"header\"")?;
        for (name, value) in headers {
            match value {
                toml::Value::String(v) => host.headers.push((name.clone(), v.clone())),
                toml::Value::Array(_) => {
                    for v in strings(value, &format!("header {name:?}"))? {
                        host.headers.push((name.clone(), v));
                    }
                }
                // The value may be a credential: only its type is said.
                other => {
                    return Err(format!(
                        "invalid type {} for header {name:?}",
                        other.type_str()
                    ));
                }
            }
        }
    }
    Ok(host)
}

/// Go's `path.Clean` for an absolute URL path.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// containerd's own test file (remotes/docker/config/hosts_test.go,
    /// TestParseHostFile), read the same way.
    #[test]
    fn reads_containerds_own_example_as_containerd_does() {
        let text = r#"
server = "https://test-default.registry"
ca = "/etc/path/default"
[header]
  x-custom-1 = "custom header"

[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://noncompliantmirror.registry/v2/namespaceprefix"]
  capabilities = ["pull"]
  override_path = true

[host."https://noprefixnoncompliant.registry"]
  override_path = true
"#;
        let hosts = parse(Path::new("/etc/containerd/certs.d/x"), text).expect("parses");
        let summary: Vec<(String, String, String, bool, bool)> = hosts
            .iter()
            .map(|h| {
                (
                    h.scheme.as_str().to_string(),
                    h.authority.clone(),
                    h.path.clone(),
                    h.pull,
                    h.resolve,
                )
            })
            .collect();
        let row = |s: &str, a: &str, p: &str, pull, resolve| {
            (s.to_string(), a.to_string(), p.to_string(), pull, resolve)
        };
        assert_eq!(
            summary,
            vec![
                row("https", "mirror.registry", "/v2", true, false),
                row("https", "mirror-bak.registry", "/us/v2", true, false),
                row("http", "mirror.registry", "/v2", true, false),
                row("https", "test-1.registry", "/v2", true, true),
                row("https", "test-2.registry", "/v2", true, true),
                row("https", "test-3.registry", "/v2", true, true),
                row(
                    "https",
                    "noncompliantmirror.registry",
                    "/v2/namespaceprefix",
                    true,
                    false
                ),
                row("https", "noprefixnoncompliant.registry", "", true, true),
                row("https", "test-default.registry", "/v2", true, true),
            ]
        );
        assert_eq!(hosts[0].ca, [PathBuf::from("/etc/certs/mirror.pem")]);
        assert_eq!(hosts[0].skip_verify, Some(false));
        assert_eq!(
            hosts[0].headers,
            [
                ("x-custom-2".to_string(), "value1".to_string()),
                ("x-custom-2".to_string(), "value2".to_string())
            ]
        );
        assert_eq!(hosts[1].skip_verify, Some(true));
        assert_eq!(
            hosts[3].client,
            [
                (
                    PathBuf::from("/etc/certs/client.cert"),
                    Some(PathBuf::from("/etc/certs/client.key"))
                ),
                (PathBuf::from("/etc/certs/client.pem"), None)
            ]
        );
        assert_eq!(
            hosts[4].client,
            [(PathBuf::from("/etc/certs/client.pem"), None)]
        );
        assert_eq!(hosts[5].client.len(), 2);
        let server = &hosts[8];
        assert_eq!(server.ca, [PathBuf::from("/etc/path/default")]);
        assert_eq!(
            server.headers,
            [("x-custom-1".to_string(), "custom header".to_string())]
        );
    }

    #[test]
    fn relative_files_are_read_from_the_hosts_directory_and_bad_capabilities_are_errors() {
        let hosts = parse(
            Path::new("/certs.d/r.io"),
            "[host.\"m.io\"]\n  ca = \"ca.crt\"\n",
        )
        .expect("parses");
        assert_eq!(hosts[0].ca, [PathBuf::from("/certs.d/r.io/ca.crt")]);
        assert_eq!(hosts[0].scheme, Scheme::Https, "no scheme: https");
        assert_eq!(
            hosts[1].authority, "",
            "no server: the registry, filled in later"
        );
        let err = parse(Path::new("/d"), "capabilities = [\"fly\"]\n").expect_err("unknown");
        assert!(err.contains("unknown capability fly"), "{err}");
    }

    #[test]
    fn directories_are_found_as_containerd_looks_for_them_and_the_registry_comes_last() {
        let root = tempfile::tempdir().expect("tempdir");
        // No directory: no configuration.
        let none = load(root.path(), "ghcr.io").expect("load");
        assert!(none.hosts.is_none());
        // A port's directory: host_port_ before host:port.
        std::fs::create_dir_all(root.path().join("r.io_5000_")).expect("dir");
        std::fs::write(
            root.path().join("r.io_5000_/hosts.toml"),
            "[host.\"http://m.io:80\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        )
        .expect("write");
        std::fs::create_dir_all(root.path().join("r.io:5000")).expect("dir");
        let hosts = load(root.path(), "r.io:5000")
            .expect("load")
            .hosts
            .expect("some");
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            (hosts[0].scheme, hosts[0].authority.as_str()),
            (Scheme::Http, "m.io:80")
        );
        assert_eq!(
            (
                hosts[1].scheme,
                hosts[1].authority.as_str(),
                hosts[1].path.as_str()
            ),
            (Scheme::Https, "r.io:5000", "/v2")
        );
        // Docker Hub's upstream; _default for every other registry.
        std::fs::create_dir_all(root.path().join("_default")).expect("dir");
        std::fs::write(root.path().join("_default/hosts.toml"), "").expect("write");
        let hub = load(root.path(), "docker.io")
            .expect("load")
            .hosts
            .expect("some");
        assert_eq!(hub[0].authority, "registry-1.docker.io");
        let local = load(root.path(), "localhost:5000")
            .expect("load")
            .hosts
            .expect("some");
        assert_eq!(
            (local[0].scheme, local[0].skip_verify),
            (Scheme::Http, Some(true))
        );
    }

    #[test]
    fn a_directory_without_hosts_toml_adds_its_certificate_files_and_changes_are_seen() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("r.io");
        std::fs::create_dir_all(&dir).expect("dir");
        for f in ["b.crt", "a.crt", "client.cert", "client.key", "other.pem"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        let loaded = load(root.path(), "r.io").expect("load");
        let hosts = loaded.hosts.as_ref().expect("some");
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].authority, "r.io");
        assert_eq!(hosts[0].ca, [dir.join("a.crt"), dir.join("b.crt")]);
        assert_eq!(
            hosts[0].client,
            [(dir.join("client.cert"), Some(dir.join("client.key")))]
        );
        assert!(!changed(&loaded.stamp));
        std::fs::write(dir.join("hosts.toml"), "server = \"https://other.io\"\n").expect("write");
        assert!(changed(&loaded.stamp), "a new hosts.toml is noticed");
        // One that does not parse: the certificate files, as containerd does.
        std::fs::write(dir.join("hosts.toml"), "server = [").expect("write");
        let hosts = load(root.path(), "r.io")
            .expect("load")
            .hosts
            .expect("some");
        assert_eq!(hosts[0].ca.len(), 2);
    }
}
