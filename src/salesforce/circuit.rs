//! Per-tenant circuit breaker: a tenant whose org is down, or out of API quota, is paused so its
//! events wait in the retry tiers without calling Salesforce, while every other tenant flows.
//!
//! | state | enters when | lets requests through |
//! |---|---|---|
//! | closed | start; a probe succeeded | all |
//! | open | `threshold` consecutive transient request failures, `REQUEST_LIMIT_EXCEEDED`, or API usage above the tenant's quota share | none, until the cool-down passes |
//! | half-open | the cool-down passed | one probe per cool-down; its result closes or re-opens (with a doubled cool-down, capped) |

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: the same as std's at run time, and pausable in tests, which then advance it
// instead of sleeping through cool-downs.
use tokio::time::Instant;

use prometheus::IntGauge;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        cooldown: Duration,
    },
    /// A probe went out at `probe_started`; another may go if it has not reported within the
    /// cool-down (its message may never have reached Salesforce).
    HalfOpen {
        probe_started: Instant,
        cooldown: Duration,
    },
}

/// Why a request was not let through, and when the next probe may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the circuit of this tenant is open (its org failed or its API quota share is used up); next probe in {retry_in:?}"
)]
pub struct CircuitOpen {
    /// Time until the breaker lets a probe through.
    pub retry_in: Duration,
}

/// The breaker of one tenant.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<State>,
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
    gauge: IntGauge,
}

impl CircuitBreaker {
    /// A closed breaker; `gauge` is the tenant's `portals_crm_circuit_open`.
    pub fn new(threshold: u32, base_cooldown: Duration, gauge: IntGauge) -> Self {
        gauge.set(0);
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            base_cooldown,
            max_cooldown: base_cooldown * 16,
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request may go to Salesforce now.
    pub fn allow(&self) -> Result<(), CircuitOpen> {
        let mut state = self.lock();
        let now = Instant::now();
        let cooldown = match *state {
            State::Closed { .. } => return Ok(()),
            State::Open { until, cooldown } if now >= until => cooldown,
            State::HalfOpen {
                probe_started,
                cooldown,
            } if now.duration_since(probe_started) >= cooldown => cooldown,
            State::Open { until, .. } => {
                return Err(CircuitOpen {
                    retry_in: until.saturating_duration_since(now),
                });
            }
            State::HalfOpen {
                probe_started,
                cooldown,
            } => {
                return Err(CircuitOpen {
                    retry_in: cooldown.saturating_sub(now.duration_since(probe_started)),
                });
            }
        };
        *state = State::HalfOpen {
            probe_started: now,
            cooldown,
        };
        Ok(())
    }

    /// Salesforce answered (even with per-record errors): the org is reachable.
    pub fn record_success(&self) {
        *self.lock() = State::Closed { failures: 0 };
        self.gauge.set(0);
    }

    /// The request failed transiently (outage, 5xx, timeout).
    pub fn record_failure(&self) {
        let mut state = self.lock();
        let next = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } => self.open(self.base_cooldown),
            State::HalfOpen { cooldown, .. } => self.open((cooldown * 2).min(self.max_cooldown)),
            open @ State::Open { .. } => open,
        };
        *state = next;
    }

    /// Opens at once: out of quota (REQUEST_LIMIT_EXCEEDED, or usage above the share).
    pub fn trip(&self) {
        let mut state = self.lock();
        if !matches!(*state, State::Open { .. }) {
            let cooldown = match *state {
                State::HalfOpen { cooldown, .. } => (cooldown * 2).min(self.max_cooldown),
                _ => self.base_cooldown,
            };
            *state = self.open(cooldown);
        }
    }

    fn open(&self, cooldown: Duration) -> State {
        self.gauge.set(1);
        State::Open {
            until: Instant::now() + cooldown,
            cooldown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            3,
            Duration::from_millis(cooldown_ms),
            IntGauge::new("g", "g").unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let b = breaker(30);
        b.record_failure();
        b.record_failure();
        assert_eq!(b.allow(), Ok(()));
        b.record_failure();
        assert!(b.allow().is_err());
        assert_eq!(b.gauge.get(), 1);
        tokio::time::advance(Duration::from_millis(29)).await;
        assert!(b.allow().is_err(), "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.allow(), Ok(()), "one probe");
        assert!(b.allow().is_err(), "only one");
        b.record_success();
        assert_eq!(b.allow(), Ok(()));
        assert_eq!(b.gauge.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer() {
        let b = breaker(20);
        b.trip();
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(b.allow(), Ok(()));
        b.record_failure();
        tokio::time::advance(Duration::from_millis(39)).await;
        assert!(b.allow().is_err(), "cool-down doubled to 40 ms");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.allow(), Ok(()));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let b = breaker(1000);
        b.record_failure();
        b.record_failure();
        b.record_success();
        b.record_failure();
        b.record_failure();
        assert_eq!(b.allow(), Ok(()));
    }
}
