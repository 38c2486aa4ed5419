//! Typed resolution errors. Every message names what failed and why, and none
//! carries a credential: messages are built from hosts, paths, statuses and our
//! own words, never from header values or registry bodies that could echo one.

use std::time::Duration;

use serde::Serialize;

/// The stable, machine-readable kind of a failure (`error.kind` in JSON output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    InvalidReference,
    NotFound,
    Unauthorized,
    Tls,
    Unreachable,
    Timeout,
    RateLimited,
    PlatformNotFound,
    /// The image is there, verified, and cannot be used (its manifest or
    /// config is malformed or of an unsupported kind, an argument holds a
    /// NUL, indexes nest too deep): asking again cannot help.
    UnsupportedImage,
    InvalidResponse,
    RegistryError,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidReference => "invalid-reference",
            Self::NotFound => "not-found",
            Self::Unauthorized => "unauthorized",
            Self::Tls => "tls",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate-limited",
            Self::PlatformNotFound => "platform-not-found",
            Self::UnsupportedImage => "unsupported-image",
            Self::InvalidResponse => "invalid-response",
            Self::RegistryError => "registry-error",
        }
    }

    /// Definitive failures will not change by asking again soon: they may be
    /// cached briefly and an admission review may be denied on them. The rest are
    /// transient (the registry or the network may recover).
    pub fn is_definitive(self) -> bool {
        matches!(
            self,
            Self::InvalidReference
                | Self::NotFound
                | Self::Unauthorized
                | Self::PlatformNotFound
                | Self::UnsupportedImage
        )
    }
}

/// A failure talking to a registry, before it is tied to the image asked for.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} not found in {registry} ({code})")]
    NotFound {
        registry: String,
        what: String,
        code: String,
    },
    #[error("{registry} refused the request: {detail}")]
    Unauthorized { registry: String, detail: String },
    #[error("TLS with {registry} failed: {detail}")]
    Tls { registry: String, detail: String },
    #[error("cannot reach {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("{registry} did not answer within {}s", after.as_secs_f32())]
    Timeout { registry: String, after: Duration },
    #[error("{registry} is rate limiting requests (HTTP 429{})", retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        registry: String,
        retry_after: Option<Duration>,
    },
    #[error("no image for platform {wanted} in the index; it has: {}", if available.is_empty() { "no platforms".to_string() } else { available.join(", ") })]
    PlatformNotFound {
        wanted: String,
        available: Vec<String>,
    },
    #[error("{registry} serves an image that cannot be used: {detail}")]
    UnsupportedImage { registry: String, detail: String },
    #[error("{registry} sent an invalid response: {detail}")]
    InvalidResponse { registry: String, detail: String },
    #[error("{registry} answered HTTP {status} for {what}")]
    Status {
        registry: String,
        what: String,
        status: u16,
    },
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Unauthorized { .. } => ErrorKind::Unauthorized,
            Self::Tls { .. } => ErrorKind::Tls,
            Self::Unreachable { .. } => ErrorKind::Unreachable,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::PlatformNotFound { .. } => ErrorKind::PlatformNotFound,
            Self::UnsupportedImage { .. } => ErrorKind::UnsupportedImage,
            Self::InvalidResponse { .. } => ErrorKind::InvalidResponse,
            Self::Status { .. } => ErrorKind::RegistryError,
        }
    }
}

/// Why resolving one image failed: the image as given plus the cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid image reference {image:?}: {reason}")]
    InvalidReference { image: String, reason: String },
    #[error("{image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
}

impl ResolveError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidReference { .. } => ErrorKind::InvalidReference,
            Self::Registry { source, .. } => source.kind(),
        }
    }

    /// How long the registry asked us to wait, when it rate-limited us.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Registry {
                source: RegistryError::RateLimited { retry_after, .. },
                ..
            } => *retry_after,
            _ => None,
        }
    }
}
