//! Readiness: named checks that every part of the process reports into, and
//! the shutdown state that turns the process not ready.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

/// Readiness checks by name; the process is ready when all are.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Result<(), String>>>,
    /// Shutting down: every answer says `Connection: close`.
    draining: AtomicBool,
}

impl Readiness {
    pub fn set(&self, check: &'static str, state: Result<(), String>) {
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(check, state);
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

    /// Whether every check is ready, and `{"ready", "checks": {name:
    /// {"ready", "reason"}}}` for `/readyz`.
    pub fn snapshot(&self) -> (bool, serde_json::Value) {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = checks.values().all(Result::is_ok);
        let detail: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(name, state)| {
                let v = match state {
                    Ok(()) => json!({"ready": true}),
                    Err(reason) => json!({"ready": false, "reason": reason}),
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
    fn ready_only_when_every_check_is_and_never_after_shutdown_began() {
        let readiness = Readiness::default();
        assert!(readiness.snapshot().0, "no checks yet");
        readiness.set("a", Ok(()));
        readiness.set("b", Err("waiting".into()));
        let (ready, detail) = readiness.snapshot();
        assert!(!ready);
        assert_eq!(detail["checks"]["b"]["reason"], "waiting");
        readiness.set("b", Ok(()));
        assert!(readiness.snapshot().0);
        readiness.begin_shutdown();
        assert!(!readiness.snapshot().0 && readiness.is_draining());
    }
}
