//! Reconnect delays for clients of the coordinator: exponential backoff, capped, with equal jitter
//! (each delay drawn from the upper half of the current ceiling). When a coordinator restarts, its
//! thousand workers then come back spread over seconds instead of in one burst, and none waits
//! longer than the cap.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// First ceiling of a client that just lost its coordinator.
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// Largest ceiling.
pub const RECONNECT_CAP: Duration = Duration::from_secs(5);

/// Successive reconnect delays.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    ceiling: Duration,
    state: u64,
}

impl Backoff {
    /// Delays from `base` doubling up to `cap`, jittered by a generator seeded from this process
    /// and the clock (so two workers started together draw different delays).
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Backoff::seeded(base, cap, nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// [`Backoff::new`] with a fixed seed (tests, and many clients in one process).
    pub fn seeded(base: Duration, cap: Duration, seed: u64) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            ceiling: base,
            state: seed,
        }
    }

    /// The workers' policy: [`RECONNECT_BASE`] doubling to [`RECONNECT_CAP`].
    pub fn reconnect() -> Backoff {
        Backoff::new(RECONNECT_BASE, RECONNECT_CAP)
    }

    /// The next delay, in `[ceiling / 2, ceiling]`; the ceiling then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.cap);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        half + Duration::from_nanos(self.next_u64() % spread.max(1))
    }

    /// Back to the first ceiling (the connection worked).
    pub fn reset(&mut self) {
        self.ceiling = self.base;
    }

    /// splitmix64: enough randomness to spread reconnections, no dependency.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays stay in the upper half of a ceiling that doubles to the cap; a reset starts over.
    #[test]
    fn delays_double_to_the_cap_with_jitter() {
        let mut b = Backoff::seeded(Duration::from_millis(200), Duration::from_secs(5), 7);
        let mut ceiling = Duration::from_millis(200);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(5));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }

    /// A thousand clients that lost the coordinator at once spread their first retries over the
    /// whole first window rather than landing together.
    #[test]
    fn many_clients_spread_out() {
        let firsts: Vec<u128> = (0..1000u64)
            .map(|i| {
                Backoff::seeded(Duration::from_secs(2), Duration::from_secs(5), i)
                    .next_delay()
                    .as_millis()
            })
            .collect();
        let mut per_100ms = [0usize; 10];
        for ms in &firsts {
            per_100ms[((*ms - 1000) / 100).min(9) as usize] += 1;
        }
        assert!(
            per_100ms.iter().all(|n| (50..=150).contains(n)),
            "{per_100ms:?}"
        );
    }
}
