//! Rate limits, with `governor`'s keyed GCRA limiters: requests per principal, and login
//! attempts per user name and per client address (the brute-force guard).
//!
//! Replicas do not share counters; each enforces its share. A replica counts the API replicas
//! on NATS (they answer the micro-service ping) and charges every request that many cells
//! against the full limit, so N replicas together let through about the configured rate
//! however a load balancer spreads the requests.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The limits, as configured.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Sustained requests per second per principal; 0 switches the limit off.
    pub requests_per_second: u32,
    /// Requests per principal allowed in a burst.
    pub burst: u32,
    /// Login attempts per user name allowed in a burst.
    pub login_burst: u32,
    /// After the burst, one more login attempt per user name per this interval.
    pub login_interval: Duration,
    /// Login attempts per client address allowed in a burst.
    pub address_burst: u32,
    /// After the burst, one more login attempt per address per this interval.
    pub address_interval: Duration,
}

/// A refusal: what was limited, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// What the limit is on, in words.
    pub what: &'static str,
    /// How long until an attempt may succeed.
    pub retry_after: Duration,
}

impl Limited {
    /// The refusal in words: what was limited and when to try again.
    pub fn describe(&self) -> String {
        format!(
            "too many {}; retry in {} s",
            self.what,
            self.retry_after.as_secs().max(1)
        )
    }
}

/// Every limiter of one replica.
pub struct Limits {
    requests: Option<DefaultKeyedRateLimiter<String>>,
    logins_by_user: DefaultKeyedRateLimiter<String>,
    logins_by_address: DefaultKeyedRateLimiter<IpAddr>,
    replicas: AtomicU32,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("replicas", &self.replicas.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn nonzero(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value.max(1)).expect("at least one")
}

fn quota(burst: u32, interval: Duration) -> Quota {
    Quota::with_period(interval.max(Duration::from_millis(1)))
        .expect("a positive interval")
        .allow_burst(nonzero(burst))
}

impl Limits {
    /// Limiters for `settings`.
    pub fn new(settings: Settings) -> Self {
        let requests = (settings.requests_per_second > 0).then(|| {
            DefaultKeyedRateLimiter::dashmap(
                Quota::per_second(nonzero(settings.requests_per_second))
                    .allow_burst(nonzero(settings.burst.max(settings.requests_per_second))),
            )
        });
        Self {
            requests,
            logins_by_user: DefaultKeyedRateLimiter::dashmap(quota(
                settings.login_burst,
                settings.login_interval,
            )),
            logins_by_address: DefaultKeyedRateLimiter::dashmap(quota(
                settings.address_burst,
                settings.address_interval,
            )),
            replicas: AtomicU32::new(1),
            clock: DefaultClock::default(),
        }
    }

    /// Sets how many API replicas share the limits.
    pub fn set_replicas(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    /// How many API replicas share the limits.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    fn charge<K: Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        what: &'static str,
    ) -> Result<(), Limited> {
        // More replicas than the burst allows would refuse everything: charge at most the
        // whole burst.
        let cells = nonzero(self.replicas());
        let outcome = limiter
            .check_key_n(key, cells)
            .or_else(|_| limiter.check_key_n(key, nonzero(1)));
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited {
                what,
                retry_after: not_until
                    .wait_time_from(self.clock.now())
                    .max(Duration::from_secs(1)),
            }),
            Err(_) => Err(Limited {
                what,
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Counts a request of `principal`.
    pub fn request(&self, principal: &str) -> Result<(), Limited> {
        match &self.requests {
            Some(limiter) => {
                self.charge(limiter, &principal.to_owned(), "requests of this principal")
            }
            None => Ok(()),
        }
    }

    /// Counts a login attempt for `username` from `address`; refused while either is locked
    /// out. Refused attempts are not counted, so a lockout ends on time however often an
    /// attacker knocks.
    pub fn login(&self, username: &str, address: Option<IpAddr>) -> Result<(), Limited> {
        if let Some(address) = address {
            self.charge(
                &self.logins_by_address,
                &address,
                "login attempts from this address",
            )?;
        }
        self.charge(
            &self.logins_by_user,
            &username.to_owned(),
            "login attempts for this user",
        )
    }

    /// Counts a refused credential (a bad or expired token) from `address` against the
    /// address's login allowance: guessing tokens is limited like guessing passwords.
    pub fn failed_credential(&self, address: Option<IpAddr>) -> Result<(), Limited> {
        match address {
            Some(address) => self.charge(
                &self.logins_by_address,
                &address,
                "refused credentials from this address",
            ),
            None => Ok(()),
        }
    }

    /// Counts a token refresh from `address` against the address's login allowance.
    pub fn refresh(&self, address: Option<IpAddr>) -> Result<(), Limited> {
        match address {
            Some(address) => self.charge(
                &self.logins_by_address,
                &address,
                "token requests from this address",
            ),
            None => Ok(()),
        }
    }

    /// Drops the state of keys that have been quiet for a full period, so that a flood of
    /// distinct names or addresses does not grow memory without bound.
    pub fn housekeep(&self) {
        if let Some(requests) = &self.requests {
            requests.retain_recent();
            requests.shrink_to_fit();
        }
        self.logins_by_user.retain_recent();
        self.logins_by_user.shrink_to_fit();
        self.logins_by_address.retain_recent();
        self.logins_by_address.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            requests_per_second: 5,
            burst: 5,
            login_burst: 3,
            login_interval: Duration::from_secs(60),
            address_burst: 100,
            address_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_burst_of_logins_locks_the_user_out_and_says_when_to_retry() {
        let limits = Limits::new(settings());
        for _ in 0..3 {
            assert!(limits.login("alice", None).is_ok());
        }
        let refused = limits.login("alice", None).expect_err("locked out");
        assert!(refused.retry_after > Duration::from_secs(50), "{refused:?}");
        assert!(
            limits.login("bob", None).is_ok(),
            "other users are not affected"
        );
    }

    #[test]
    fn replicas_share_a_limit_by_charging_more_cells_each() {
        let limits = Limits::new(settings());
        limits.set_replicas(5);
        assert!(limits.request("alice").is_ok());
        assert!(
            limits.request("alice").is_err(),
            "one replica of five gets a fifth"
        );
    }

    #[test]
    fn a_zero_rate_switches_the_request_limit_off() {
        let limits = Limits::new(Settings {
            requests_per_second: 0,
            ..settings()
        });
        assert!((0..1000).all(|_| limits.request("alice").is_ok()));
    }
}
