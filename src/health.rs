//! Readiness: named checks that every part of the process reports into, and
//! the shutdown state that turns the process not ready.
//!
//! A check is ready, degraded (the webhook serves, something around it is
//! not right: a reason an operator should read) or not ready. Only a check
//! that is not ready makes `/readyz` answer 503: a replica that can admit
//! pods stays in the Service even when a background task fails.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

/// The state of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ready,
    /// Serving, with a reason worth an operator's attention.
    Degraded(String),
    NotReady(String),
}

/// `Ok` is ready, `Err(reason)` not ready.
impl From<Result<(), String>> for Check {
    fn from(state: Result<(), String>) -> Self {
        match state {
            Ok(()) => Self::Ready,
            Err(reason) => Self::NotReady(reason),
        }
    }
}

/// Readiness checks by name; the process is ready when none is not ready.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Check>>,
    /// Shutting down: every answer says `Connection: close`.
    draining: AtomicBool,
}

impl Readiness {
    pub fn set(&self, check: &'static str, state: impl Into<Check>) {
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(check, state.into());
    }

    /// The current state of `check`, if it was ever set.
    pub fn get(&self, check: &str) -> Option<Check> {
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(check)
            .cloned()
    }

    /// SIGTERM: not ready from now on, and clients are told to re-dial
    /// (another replica) after their current request.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        self.set("shutdown", Err("shutting down".into()));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether no check is not ready, and `{"ready", "checks": {name:
    /// {"state", "ready", "reason"}}}` for `/readyz` (`state`: `ready`,
    /// `degraded` or `not-ready`; a degraded check is ready, with a reason).
    pub fn snapshot(&self) -> (bool, serde_json::Value) {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = !checks.values().any(|c| matches!(c, Check::NotReady(_)));
        let detail: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(name, state)| {
                let v = match state {
                    Check::Ready => json!({"state": "ready", "ready": true}),
                    Check::Degraded(reason) => {
                        json!({"state": "degraded", "ready": true, "reason": reason})
                    }
                    Check::NotReady(reason) => {
                        json!({"state": "not-ready", "ready": false, "reason": reason})
                    }
                };
                (name.to_string(), v)
            })
            .collect();
        (ready, json!({"ready": ready, "checks": detail}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_no_check_is_not_ready_and_never_after_shutdown_began() {
        let readiness = Readiness::default();
        assert!(readiness.snapshot().0, "no checks yet");
        readiness.set("a", Ok(()));
        readiness.set("b", Err("waiting".into()));
        let (ready, detail) = readiness.snapshot();
        assert!(!ready);
        assert_eq!(detail["checks"]["b"]["reason"], "waiting");
        assert_eq!(detail["checks"]["b"]["state"], "not-ready");
        readiness.set("b", Check::Degraded("serving without X".into()));
        let (ready, detail) = readiness.snapshot();
        assert!(ready, "a degraded check is ready");
        assert_eq!(detail["checks"]["b"]["state"], "degraded");
        assert_eq!(detail["checks"]["b"]["ready"], true);
        assert_eq!(detail["checks"]["b"]["reason"], "serving without X");
        readiness.set("b", Ok(()));
        assert!(readiness.snapshot().0);
        readiness.begin_shutdown();
        assert!(!readiness.snapshot().0 && readiness.is_draining());
    }
}
