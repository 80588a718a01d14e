//! The one place that uses the `backoff` crate (flagged unmaintained upstream, RUSTSEC-2025-0012),
//! so swapping it touches nothing else.

use std::time::Duration;

use backoff::backoff::Backoff as _;

/// Starts at `initial`, doubles up to `max`, ±50 % jitter; gives up after `give_up_after`.
fn doubling(
    initial: Duration,
    max: Duration,
    give_up_after: Option<Duration>,
) -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: initial,
        current_interval: initial,
        max_interval: max,
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_elapsed_time: give_up_after,
        ..backoff::ExponentialBackoff::default()
    }
}

/// Exponential backoff with jitter for reconnecting to the broker.
pub struct Reconnect {
    inner: backoff::ExponentialBackoff,
}

impl Reconnect {
    /// Starts at `initial`, doubles up to `max`, with ±50 % jitter, never gives up; no wait is
    /// longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            inner: doubling(initial, max, None),
        }
    }

    /// The wait before the next attempt, at most the `max` it was made with. The `backoff`
    /// crate caps the interval before it draws the jitter, so its draw can be half again as
    /// long as `max` (45 s for the broker's 30 s); once at the cap the waits are drawn from
    /// half of `max` to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let max = self.inner.max_interval;
        self.inner.next_backoff().unwrap_or(max).min(max)
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Exponential backoff with jitter for publishing again a message the broker nacked
/// ([`crate::amqp::Publisher::publish_republishing`]): starts at `initial`, doubles up to `max`,
/// ±50 % jitter, and gives up once `give_up_after` has passed since it was made.
pub struct Republish {
    inner: backoff::ExponentialBackoff,
}

impl Republish {
    /// A fresh policy; its clock starts now.
    pub fn new(initial: Duration, max: Duration, give_up_after: Duration) -> Self {
        Self {
            inner: doubling(initial, max, Some(give_up_after)),
        }
    }

    /// The wait before the next attempt, at most `max` (as [`Reconnect::next_delay`]); `None`
    /// once it is time to give up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let max = self.inner.max_interval;
        self.inner.next_backoff().map(|delay| delay.min(max))
    }
}

/// A retry tier's delay with up to 20 % taken off at random, so that a burst of failures does
/// not come back from a tier as the same burst. Never longer than the tier: the tier queue's
/// own TTL is the upper bound anyway.
pub fn jittered(delay: Duration) -> Duration {
    let mut policy = backoff::ExponentialBackoff {
        initial_interval: delay,
        current_interval: delay,
        randomization_factor: 0.2,
        multiplier: 1.0,
        max_interval: delay * 2,
        max_elapsed_time: None,
        ..backoff::ExponentialBackoff::default()
    };
    let drawn = policy.next_backoff().unwrap_or(delay);
    if drawn > delay {
        delay.saturating_sub(drawn - delay)
    } else {
        drawn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_80_to_100_percent() {
        let delay = Duration::from_secs(10);
        for _ in 0..200 {
            let d = jittered(delay);
            assert!(d <= delay && d >= Duration::from_secs(8), "{d:?}");
        }
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let mut policy = Reconnect::new(Duration::from_millis(100), Duration::from_secs(2));
        // Enough draws at the cap that a draw over it (up to 3 s before the cap) would show.
        let delays: Vec<Duration> = (0..200).map(|_| policy.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(150));
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(delays[9] >= Duration::from_secs(1));
        policy.reset();
        assert!(policy.next_delay() <= Duration::from_millis(150));
    }

    #[test]
    fn republishing_starts_small_doubles_and_gives_up() {
        let mut policy = Republish::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
            Duration::from_millis(50),
        );
        let first = policy.next_delay().unwrap();
        assert!(first <= Duration::from_millis(15), "{first:?}");
        let second = policy.next_delay().unwrap();
        assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(policy.next_delay(), None, "gives up after 50 ms");
        let mut capped = Republish::new(
            Duration::from_millis(10),
            Duration::from_millis(40),
            Duration::from_secs(3600),
        );
        let delays: Vec<Duration> = (0..200).filter_map(|_| capped.next_delay()).collect();
        assert_eq!(delays.len(), 200);
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(40)),
            "{delays:?}"
        );
    }
}
