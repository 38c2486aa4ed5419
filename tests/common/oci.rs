//! Deterministic test images (config, layer, manifest, index) and a pusher
//! that uploads them through the registry HTTP API.

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A blob to upload.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256(&bytes),
            bytes,
        }
    }
}

/// A single-platform image: its blobs and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub config: Blob,
    pub layer: Blob,
    pub manifest: Vec<u8>,
    pub media_type: &'static str,
    pub digest: String,
    pub platform: (String, String),
}

/// Builds an image whose config has the given Entrypoint and Cmd. `name`
/// makes the layer (and so the digest) unique; `docker` picks Docker schema 2
/// media types instead of OCI.
pub fn image(
    name: &str,
    entrypoint: Option<&[&str]>,
    cmd: Option<&[&str]>,
    platform: &str,
    docker: bool,
) -> Image {
    let (os, arch) = platform.split_once('/').expect("os/arch");
    let mut container = serde_json::Map::new();
    if let Some(e) = entrypoint {
        container.insert("Entrypoint".into(), json!(e));
    }
    if let Some(c) = cmd {
        container.insert("Cmd".into(), json!(c));
    }
    container.insert("Env".into(), json!(["PATH=/usr/local/bin:/usr/bin:/bin"]));
    // A real gzipped tar, so that containerd can unpack the image too,
    // holding one file that makes it unique per image name and platform.
    let (layer, diff_id) = layer_of(&[File::new(
        &format!("fnir-test/{}", name.replace('/', "_")),
        format!("layer of {name} for {platform}").as_bytes(),
        0o644,
    )]);
    let config = Blob::new(
        serde_json::to_vec(&json!({
            "architecture": arch,
            "os": os,
            "config": Value::Object(container),
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": format!("fn-image-resolver tests: {name}")}],
        }))
        .expect("config json"),
    );
    manifest_of(config, layer, docker, (os.to_string(), arch.to_string()))
}

/// An image whose config is `config` as given (any keys, any platform or
/// none), with one real layer unique to `name`: its `rootfs` is set to
/// that layer, so that containerd can unpack the image too.
pub fn image_with_config(name: &str, mut config: Value, docker: bool) -> Image {
    let (layer, diff_id) = layer_of(&[File::new(
        &format!("fnir-test/{}", name.replace('/', "_")),
        format!("layer of {name}").as_bytes(),
        0o644,
    )]);
    if let Some(object) = config.as_object_mut() {
        object.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": [diff_id]}),
        );
    }
    let platform = platform_of(&config);
    let config = Blob::new(config.to_string().into_bytes());
    manifest_of(config, layer, docker, platform)
}

/// The `os` and `architecture` a config says (empty when it says none).
fn platform_of(config: &Value) -> (String, String) {
    let field = |key: &str| config[key].as_str().unwrap_or_default().to_string();
    (field("os"), field("architecture"))
}

/// The same with the config's exact text (keys in the order written:
/// `serde_json::Value` sorts them).
pub fn image_with_config_text(name: &str, config: &str, docker: bool) -> Image {
    let layer = Blob::new(format!("layer of {name}").into_bytes());
    let parsed: Value = serde_json::from_str(config).expect("config json");
    let platform = platform_of(&parsed);
    let config = Blob::new(config.as_bytes().to_vec());
    manifest_of(config, layer, docker, platform)
}

/// A file in a layer.
#[derive(Debug, Clone)]
pub struct File {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl File {
    pub fn new(path: &str, bytes: &[u8], mode: u32) -> Self {
        Self {
            path: path.trim_start_matches('/').to_string(),
            bytes: bytes.to_vec(),
            mode,
        }
    }
}

/// A gzipped tar layer of `files` (their parent directories included),
/// reproducible (owner root, time 0), and its diff ID (the digest of the
/// tar itself, which containerd checks against the config's `rootfs`).
pub fn layer_of(files: &[File]) -> (Blob, String) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for file in files {
        let mut parent = std::path::Path::new(&file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for dir in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        builder
            .append_data(&mut h, dir, std::io::empty())
            .expect("tar dir");
    }
    for file in files {
        let mut h = header(tar::EntryType::Regular, file.mode, file.bytes.len() as u64);
        builder
            .append_data(&mut h, &file.path, file.bytes.as_slice())
            .expect("tar file");
    }
    let tar = builder.into_inner().expect("tar");
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    (Blob::new(gz.finish().expect("gzip")), diff_id)
}

/// A linux/amd64 OCI image that a node can run: one layer of `files`, and
/// `config` (Entrypoint, Cmd, Env, User, …) as the image's `config`.
pub fn runnable_image(files: &[File], config: Value) -> Image {
    let (layer, diff_id) = layer_of(files);
    let config = Blob::new(
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .expect("config json"),
    );
    manifest_of(config, layer, false, ("linux".into(), "amd64".into()))
}

/// The image manifest of one config and one layer.
fn manifest_of(config: Blob, layer: Blob, docker: bool, platform: (String, String)) -> Image {
    let (media_type, config_type, layer_type) = if docker {
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    } else {
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    };
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": config.digest, "size": config.bytes.len()},
        "layers": [{"mediaType": layer_type, "digest": layer.digest, "size": layer.bytes.len()}],
    }))
    .expect("manifest json");
    Image {
        digest: sha256(&manifest),
        config,
        layer,
        manifest,
        media_type,
        platform,
    }
}

/// A multi-platform index: its images and nested indexes (all uploaded
/// before it) and its body.
#[derive(Debug, Clone)]
pub struct Index {
    pub images: Vec<Image>,
    pub nested: Vec<Index>,
    pub body: Vec<u8>,
    pub media_type: &'static str,
    pub digest: String,
}

/// One entry of an index: an image or an index, with the `platform` (and
/// `annotations`) the entry states; `None`: the field is left out.
#[derive(Debug, Clone)]
pub struct Child {
    pub target: Target,
    pub platform: Option<Value>,
    pub annotations: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Target {
    Image(Image),
    Index(Index),
}

impl Child {
    /// `image` with the platform of its config.
    pub fn image(image: Image) -> Self {
        let platform = Some(json!({"os": image.platform.0, "architecture": image.platform.1}));
        Self {
            target: Target::Image(image),
            platform,
            annotations: None,
        }
    }

    /// `image` listed with `platform` (`None`: no platform field at all).
    pub fn image_as(image: Image, platform: Option<Value>) -> Self {
        Self {
            target: Target::Image(image),
            platform,
            annotations: None,
        }
    }

    pub fn index(index: Index, platform: Option<Value>) -> Self {
        Self {
            target: Target::Index(index),
            platform,
            annotations: None,
        }
    }
}

/// An index over `children`, in this order.
pub fn index_of(children: Vec<Child>, docker: bool) -> Index {
    let media_type = if docker { DOCKER_LIST } else { OCI_INDEX };
    let mut images = Vec::new();
    let mut nested = Vec::new();
    let manifests: Vec<Value> = children
        .into_iter()
        .map(|child| {
            let (child_type, digest, size) = match &child.target {
                Target::Image(i) => (i.media_type, i.digest.clone(), i.manifest.len()),
                Target::Index(i) => (i.media_type, i.digest.clone(), i.body.len()),
            };
            let mut entry = json!({"mediaType": child_type, "digest": digest, "size": size});
            if let Some(platform) = child.platform {
                entry["platform"] = platform;
            }
            if let Some(annotations) = child.annotations {
                entry["annotations"] = annotations;
            }
            match child.target {
                Target::Image(i) => images.push(i),
                Target::Index(i) => nested.push(i),
            }
            entry
        })
        .collect();
    let body = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    }))
    .expect("index json");
    Index {
        digest: sha256(&body),
        images,
        nested,
        body,
        media_type,
    }
}

/// A multi-platform index over `images`, each listed with its platform.
pub fn index(images: Vec<Image>, docker: bool) -> Index {
    index_of(images.into_iter().map(Child::image).collect(), docker)
}

/// Uploads images to a registry at `base` (e.g. `http://127.0.0.1:5000`).
#[derive(Debug, Clone)]
pub struct Pusher {
    pub base: String,
    pub client: reqwest::Client,
    /// `Authorization` header value, if the registry needs one for pushing.
    pub authorization: Option<String>,
}

impl Pusher {
    pub fn new(base: impl Into<String>, client: reqwest::Client) -> Self {
        Self {
            base: base.into(),
            client,
            authorization: None,
        }
    }

    pub fn basic(mut self, user: &str, pass: &str) -> Self {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        self.authorization = Some(format!("Basic {encoded}"));
        self
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, url);
        if let Some(a) = &self.authorization {
            r = r.header("Authorization", a);
        }
        r
    }

    pub async fn blob(&self, repo: &str, blob: &Blob) {
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .expect("start upload");
        assert_eq!(
            resp.status().as_u16(),
            202,
            "start upload to {repo}: {}",
            resp.status()
        );
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload location")
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{location}{sep}digest={}", blob.digest),
            )
            .header("Content-Type", "application/octet-stream")
            .body(blob.bytes.clone())
            .send()
            .await
            .expect("finish upload");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "upload blob to {repo}: {}",
            resp.status()
        );
    }

    pub async fn manifest(&self, repo: &str, reference: &str, body: &[u8], media_type: &str) {
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("put manifest");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status.as_u16(),
            201,
            "put manifest {repo}:{reference}: {text}"
        );
    }

    pub async fn image(&self, repo: &str, tag: &str, image: &Image) {
        self.blob(repo, &image.layer).await;
        self.blob(repo, &image.config).await;
        self.manifest(repo, tag, &image.manifest, image.media_type)
            .await;
    }

    /// Pushes `image` under `n` tags `{prefix}0` … `{prefix}{n-1}`: the blobs
    /// once, then the manifest per tag, 16 at a time.
    pub async fn tags(&self, repo: &str, prefix: &str, image: &Image, n: usize) {
        use futures_util::StreamExt as _;
        if n == 0 {
            return;
        }
        self.image(repo, &format!("{prefix}0"), image).await;
        futures_util::stream::iter(1..n)
            .for_each_concurrent(16, |i| async move {
                self.manifest(
                    repo,
                    &format!("{prefix}{i}"),
                    &image.manifest,
                    image.media_type,
                )
                .await;
            })
            .await;
    }

    pub async fn index(&self, repo: &str, tag: &str, index: &Index) {
        for image in &index.images {
            self.blob(repo, &image.layer).await;
            self.blob(repo, &image.config).await;
            self.manifest(repo, &image.digest, &image.manifest, image.media_type)
                .await;
        }
        for nested in &index.nested {
            Box::pin(self.index(repo, &nested.digest, nested)).await;
        }
        self.manifest(repo, tag, &index.body, index.media_type)
            .await;
    }
}

/// The sample function images: what the README demo and many tests use.
#[derive(Debug, Clone)]
pub struct Samples {
    /// `fns/set-namespace:v0.4`: OCI image with Entrypoint.
    pub entrypoint: Image,
    /// `fns/cmd-only:v1`: Docker schema 2 image with only Cmd.
    pub cmd_only: Image,
    /// `fns/no-entrypoint:v1`: neither Entrypoint nor Cmd.
    pub neither: Image,
    /// `fns/multi-arch:v1`: OCI index, amd64 and arm64 with different entrypoints.
    pub multi: Index,
    /// `nephio/porch-wrapper-server:v4`: the image of a Porch function pod's
    /// init container `copy-wrapper-server`.
    pub wrapper: Image,
}

pub fn samples() -> Samples {
    Samples {
        entrypoint: image(
            "set-namespace",
            Some(&["/usr/local/bin/function"]),
            None,
            "linux/amd64",
            false,
        ),
        cmd_only: image(
            "cmd-only",
            None,
            Some(&["/bin/fn", "--serve"]),
            "linux/amd64",
            true,
        ),
        neither: image("no-entrypoint", None, None, "linux/amd64", false),
        multi: index(
            vec![
                image(
                    "multi-arch",
                    Some(&["/fn-amd64"]),
                    None,
                    "linux/amd64",
                    false,
                ),
                image(
                    "multi-arch",
                    Some(&["/fn-arm64"]),
                    Some(&["--arm"]),
                    "linux/arm64",
                    false,
                ),
            ],
            false,
        ),
        wrapper: image(
            "porch-wrapper-server",
            Some(&["/home/nonroot/wrapper-server/wrapper-server"]),
            None,
            "linux/amd64",
            false,
        ),
    }
}

impl Samples {
    pub async fn push(&self, pusher: &Pusher) {
        pusher
            .image("fns/set-namespace", "v0.4", &self.entrypoint)
            .await;
        pusher.image("fns/cmd-only", "v1", &self.cmd_only).await;
        pusher.image("fns/no-entrypoint", "v1", &self.neither).await;
        pusher.index("fns/multi-arch", "v1", &self.multi).await;
        pusher
            .image("nephio/porch-wrapper-server", "v4", &self.wrapper)
            .await;
    }
}
