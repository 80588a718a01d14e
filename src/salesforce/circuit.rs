//! Per-tenant circuit breaker: a tenant whose org is down, out of API quota, or refusing the
//! integration user's sign-in is paused so its events wait in the retry tiers without calling
//! Salesforce, while every other tenant flows.
//!
//! | state | enters when | lets requests through |
//! |---|---|---|
//! | closed | start; a probe succeeded | all |
//! | open | `threshold` consecutive transient request failures, `REQUEST_LIMIT_EXCEEDED`, API usage above the tenant's quota share, or at once when the token endpoint refuses the sign-in | none, until the cool-down passes |
//! | half-open | the cool-down passed | one probe per cool-down; its result closes or re-opens (with a doubled cool-down, capped) |
//!
//! A refused sign-in is remembered until a request succeeds: while it is, [`CircuitOpen`] says
//! so (its `sign_in` reason), the pipeline parks the tenant's bookings without counting an
//! attempt, `portals_crm_salesforce_auth_refused{tenant,reason}` is 1, `/readyz` names the
//! tenant, and the pause is logged once with Salesforce's description and the fix. Probes keep
//! going once per cool-down (30 s doubling to 8 min by default), so a fixed org resumes by
//! itself; no faster, because every refused login is a failed login in the org's login history.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock: the same as std's at run time, and pausable in tests, which then advance it
// instead of sleeping through cool-downs.
use tokio::time::Instant;

use prometheus::{IntGauge, IntGaugeVec};

use super::signin::{OAuthErrorCode, SignInRefused};

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
#[error("{}; next probe in {retry_in:?}", match sign_in {
    Some(code) => format!("the tenant is paused: Salesforce refuses the integration user's sign-in ({})", code.reason_code()),
    None => "the circuit of this tenant is open (its org failed or its API quota share is used up)".to_owned(),
})]
pub struct CircuitOpen {
    /// Time until the breaker lets a probe through.
    pub retry_in: Duration,
    /// `salesforce_auth_<error>` while the org refuses the sign-in: a configuration fault, so
    /// waiting must not spend the booking's attempts.
    pub sign_in: Option<OAuthErrorCode>,
}

/// A breaker's state, read for the Operations console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitStatus {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// While open: the time until the next probe may go.
    pub next_probe_in: Option<Duration>,
    /// `salesforce_auth_<error>` while the org refuses the sign-in.
    pub sign_in_refused: Option<&'static str>,
}

/// The tenant's `portals_crm_salesforce_auth_refused{tenant,reason}` series.
#[derive(Debug)]
struct SignInGauge {
    tenant: String,
    gauge: IntGaugeVec,
}

impl SignInGauge {
    /// Every reason of the tenant at 0: the series exist from the start (13 per tenant, a
    /// bounded set), so dashboards and alerts see "not refused" rather than no data.
    fn clear(&self) {
        for code in OAuthErrorCode::ALL {
            self.gauge
                .with_label_values(&[self.tenant.as_str(), code.reason_code()])
                .set(0);
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    refused: Option<SignInRefused>,
}

/// The breaker of one tenant.
#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Mutex<Inner>,
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
    gauge: IntGauge,
    sign_in: Option<SignInGauge>,
}

impl CircuitBreaker {
    /// A closed breaker; `gauge` is the tenant's `portals_crm_circuit_open`.
    pub fn new(threshold: u32, base_cooldown: Duration, gauge: IntGauge) -> Self {
        gauge.set(0);
        Self {
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                refused: None,
            }),
            threshold: threshold.max(1),
            base_cooldown,
            max_cooldown: base_cooldown * 16,
            gauge,
            sign_in: None,
        }
    }

    /// Reports refused sign-ins of `tenant` in `gauge` (`portals_crm_salesforce_auth_refused`,
    /// labels tenant and reason) and in the log. A new breaker (start, reload) starts with the
    /// tenant's series cleared: its next request tries the sign-in again.
    pub fn reporting_sign_in(mut self, tenant: &str, gauge: IntGaugeVec) -> Self {
        let report = SignInGauge {
            tenant: tenant.to_owned(),
            gauge,
        };
        report.clear();
        self.sign_in = Some(report);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The breaker as ops see it, without changing it: `closed`, `open` (with the time until the
    /// next probe may go) or `half_open` (a probe is out), and the refused sign-in's reason code.
    pub fn status(&self) -> CircuitStatus {
        let inner = self.lock();
        let now = Instant::now();
        let (state, next_probe_in) = match inner.state {
            State::Closed { .. } => ("closed", None),
            State::Open { until, .. } => ("open", Some(until.saturating_duration_since(now))),
            State::HalfOpen { .. } => ("half_open", None),
        };
        CircuitStatus {
            state,
            next_probe_in,
            sign_in_refused: inner.refused.as_ref().map(|r| r.reason_code()),
        }
    }

    /// The refused sign-in the breaker remembers (until a request succeeds): Salesforce's
    /// description and, through [`SignInRefused::fix`], the same fix `doctor` gives.
    pub fn refused_sign_in(&self) -> Option<SignInRefused> {
        self.lock().refused.clone()
    }

    /// Whether a request may go to Salesforce now.
    pub fn allow(&self) -> Result<(), CircuitOpen> {
        let mut inner = self.lock();
        let sign_in = inner.refused.as_ref().map(|r| r.code);
        let state = &mut inner.state;
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
                    sign_in,
                });
            }
            State::HalfOpen {
                probe_started,
                cooldown,
            } => {
                return Err(CircuitOpen {
                    retry_in: cooldown.saturating_sub(now.duration_since(probe_started)),
                    sign_in,
                });
            }
        };
        *state = State::HalfOpen {
            probe_started: now,
            cooldown,
        };
        Ok(())
    }

    /// Salesforce answered (even with per-record errors): the org is reachable, and it accepted
    /// the sign-in.
    pub fn record_success(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed { failures: 0 };
        self.gauge.set(0);
        if let Some(refused) = inner.refused.take()
            && let Some(report) = &self.sign_in
        {
            report.clear();
            tracing::info!(
                tenant = %report.tenant,
                reason = refused.reason_code(),
                "Salesforce accepts the sign-in again; tenant resumed"
            );
        }
    }

    /// The token endpoint refused the sign-in: open at once (or stay open, the cool-down doubled
    /// after a failed probe) and remember why until a request succeeds. Logged when the refusal
    /// starts or its description changes, not for every booking or probe.
    pub fn refuse_sign_in(&self, refused: &SignInRefused) {
        let mut inner = self.lock();
        let next = match inner.state {
            State::Closed { .. } => Some(self.base_cooldown),
            State::HalfOpen { cooldown, .. } => Some((cooldown * 2).min(self.max_cooldown)),
            State::Open { .. } => None,
        };
        if let Some(cooldown) = next {
            inner.state = self.open(cooldown);
        }
        if inner.refused.as_ref() == Some(refused) {
            return;
        }
        inner.refused = Some(refused.clone());
        if let Some(report) = &self.sign_in {
            report.clear();
            report
                .gauge
                .with_label_values(&[report.tenant.as_str(), refused.reason_code()])
                .set(1);
            tracing::error!(
                tenant = %report.tenant,
                reason = refused.reason_code(),
                error_description = %refused.description,
                fix = refused.fix(),
                "Salesforce refuses the integration user's sign-in: tenant paused, its bookings wait in the retry tiers without spending attempts"
            );
        }
    }

    /// The request failed transiently (outage, 5xx, timeout).
    pub fn record_failure(&self) {
        let mut inner = self.lock();
        let state = &mut inner.state;
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
        let mut inner = self.lock();
        let state = &mut inner.state;
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

    #[tokio::test(start_paused = true)]
    async fn a_refused_sign_in_pauses_until_a_request_succeeds() {
        let vec = IntGaugeVec::new(prometheus::Opts::new("r", "r"), &["tenant", "reason"]).unwrap();
        let b = breaker(20).reporting_sign_in("acme", vec.clone());
        let refused = SignInRefused::from_token_response(
            400,
            "invalid_grant",
            "user hasn't approved this consumer",
        )
        .unwrap();
        b.refuse_sign_in(&refused);
        assert_eq!(b.refused_sign_in(), Some(refused.clone()));
        let open = b.allow().unwrap_err();
        assert_eq!(open.sign_in, Some(OAuthErrorCode::InvalidGrant));
        assert_eq!(
            vec.with_label_values(&["acme", "salesforce_auth_invalid_grant"])
                .get(),
            1
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(b.allow(), Ok(()), "a probe after the cool-down");
        b.record_failure();
        assert_eq!(
            b.allow().unwrap_err().sign_in,
            Some(OAuthErrorCode::InvalidGrant),
            "an outage during the probe does not clear the refusal"
        );
        b.record_success();
        assert_eq!(b.allow(), Ok(()));
        assert_eq!(b.refused_sign_in(), None);
        assert_eq!(
            vec.with_label_values(&["acme", "salesforce_auth_invalid_grant"])
                .get(),
            0,
            "the series is gone once the sign-in works"
        );
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
