//! Faults on demand: latency, error rates, token expiry, quota exhaustion, outages.

use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The body of `POST /__emulator/faults` (every key optional) and the CLI's fault flags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Fixed latency added to every data request.
    pub latency_ms: Option<u64>,
    /// Random extra latency, uniform in 0..=jitter_ms.
    pub jitter_ms: Option<u64>,
    /// Fraction of data requests that fail (0.0–1.0).
    pub error_rate: Option<f64>,
    /// Which failures to draw from: `503`, `500`, `UNABLE_TO_LOCK_ROW`.
    pub errors: Option<Vec<String>>,
    /// Invalidate every issued token now (the next requests get 401 INVALID_SESSION_ID).
    pub expire_tokens: Option<bool>,
    /// Set the remaining daily API requests.
    pub api_quota_remaining: Option<u64>,
    /// Answer every request with 503 for this many seconds from now.
    pub outage_seconds: Option<u64>,
}

/// An injected failure for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// 503 SERVER_UNAVAILABLE.
    Unavailable,
    /// 500 UNKNOWN_EXCEPTION.
    Internal,
    /// UNABLE_TO_LOCK_ROW (one graph of a graph request, or the whole request otherwise).
    LockRow,
}

/// Faults currently in force.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    latency: Duration,
    jitter: Duration,
    error_rate: f64,
    errors: Vec<Injected>,
    outage_until: Option<Instant>,
}

impl Faults {
    /// Applies the lasting parts of a spec (latency, errors, outage). The one-shot parts
    /// (token expiry, quota) are applied by the caller, which owns that state.
    pub fn apply(&mut self, spec: &FaultSpec) -> Result<(), String> {
        if let Some(ms) = spec.latency_ms {
            self.latency = Duration::from_millis(ms);
        }
        if let Some(ms) = spec.jitter_ms {
            self.jitter = Duration::from_millis(ms);
        }
        if let Some(rate) = spec.error_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("error_rate must be within 0..1, got {rate}"));
            }
            self.error_rate = rate;
        }
        if let Some(errors) = &spec.errors {
            self.errors = errors
                .iter()
                .map(|e| match e.as_str() {
                    "503" => Ok(Injected::Unavailable),
                    "500" => Ok(Injected::Internal),
                    "UNABLE_TO_LOCK_ROW" => Ok(Injected::LockRow),
                    other => Err(format!(
                        "unknown error {other}: use 503, 500 or UNABLE_TO_LOCK_ROW"
                    )),
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(seconds) = spec.outage_seconds {
            self.outage_until = Some(Instant::now() + Duration::from_secs(seconds));
        }
        Ok(())
    }

    /// True while an outage is in force.
    pub fn in_outage(&self) -> bool {
        self.outage_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// The latency to add to this request.
    pub fn delay(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.latency;
        }
        let jitter = rand::thread_rng().gen_range(0..=self.jitter.as_millis() as u64);
        self.latency + Duration::from_millis(jitter)
    }

    /// Draws whether this request fails, and how.
    pub fn draw(&self) -> Option<Injected> {
        if self.error_rate <= 0.0 {
            return None;
        }
        let mut rng = rand::thread_rng();
        if !rng.gen_bool(self.error_rate) {
            return None;
        }
        if self.errors.is_empty() {
            return Some(Injected::Unavailable);
        }
        Some(self.errors[rng.gen_range(0..self.errors.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_errors_and_bad_rates() {
        let mut faults = Faults::default();
        assert!(
            faults
                .apply(&FaultSpec {
                    errors: Some(vec!["418".into()]),
                    ..FaultSpec::default()
                })
                .is_err()
        );
        assert!(
            faults
                .apply(&FaultSpec {
                    error_rate: Some(1.5),
                    ..FaultSpec::default()
                })
                .is_err()
        );
    }

    #[test]
    fn full_error_rate_always_fails() {
        let mut faults = Faults::default();
        faults
            .apply(&FaultSpec {
                error_rate: Some(1.0),
                errors: Some(vec!["UNABLE_TO_LOCK_ROW".into()]),
                ..FaultSpec::default()
            })
            .unwrap();
        assert!((0..50).all(|_| faults.draw() == Some(Injected::LockRow)));
    }
}
