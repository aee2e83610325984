//! Retry policies: how many attempts a job gets, which endings are worth another attempt, and
//! how long to wait before it.
//!
//! A job without a `retry` field gets [`RetryPolicy::default`]: three attempts, for lost
//! attempts only (the executor died or went silent, which says nothing about the job), with no
//! wait. A job that names a policy and leaves `retry_on` out retries every unsuccessful ending.
//! The waits grow exponentially from `backoff.initial` by `backoff.multiplier` up to
//! `backoff.max`, each shortened by a random fraction of at most `jitter` so replicas of a
//! failing fleet do not retry in step.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::SpecError;

/// An attempt's ending that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The process exited non-zero, was killed by a signal, or could not start.
    Failed,
    /// The process ran past its timeout.
    TimedOut,
    /// The executor running the attempt died, went silent or handed the attempt back.
    Lost,
}

impl RetryOn {
    /// Every ending.
    pub const ALL: [RetryOn; 3] = [Self::Failed, Self::TimedOut, Self::Lost];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Lost => "lost",
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exponential backoff between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Wait before the second attempt.
    pub initial: Duration,
    /// Factor applied to the wait after each attempt (at least 1).
    pub multiplier: f64,
    /// Longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(300),
        }
    }
}

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 means never retry).
    pub max_attempts: u32,
    /// Waits between attempts.
    pub backoff: Backoff,
    /// Fraction (0 to 1) of each wait that may be randomly taken off it.
    pub jitter: f64,
    /// Endings that are retried.
    pub retry_on: Vec<RetryOn>,
}

impl Default for RetryPolicy {
    /// Lost attempts are retried, up to three attempts, at once; failures are not retried.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff {
                initial: Duration::ZERO,
                multiplier: 1.0,
                max: Duration::ZERO,
            },
            jitter: 0.0,
            retry_on: vec![RetryOn::Lost],
        }
    }
}

/// Limits of a retry policy.
pub mod limits {
    use std::time::Duration;

    /// Most attempts a job may have.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// Longest wait between attempts.
    pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
    /// Largest backoff multiplier.
    pub const MAX_MULTIPLIER: f64 = 10.0;
    /// Attempts a job may lose before it is quarantined, whatever its policy: a job whose
    /// attempts keep taking executors down must not be passed from node to node forever.
    pub const MAX_LOST_ATTEMPTS: u32 = 3;
    /// Deliveries of one dispatch that did not end with the attempt settled (an executor that
    /// took it and vanished, or could not reach NATS to claim it) before the job is
    /// quarantined rather than left to JetStream's delivery limit (10).
    pub const MAX_DISPATCH_DELIVERIES: i64 = 8;

    /// How long a dispatch its executor could not claim (NATS unavailable: a JetStream leader
    /// being elected after its server went away, a server restarting) waits before it is
    /// delivered again, after its `delivered`-th delivery: 1 s, doubling, at most 30 s. The
    /// [`MAX_DISPATCH_DELIVERIES`] before quarantine then span two minutes, which a cluster's
    /// election fits in many times over, rather than the eight seconds a fixed second gave.
    pub fn unclaimed_dispatch_delay(delivered: i64) -> Duration {
        let doublings = u32::try_from(delivered.saturating_sub(1))
            .unwrap_or(0)
            .min(5);
        Duration::from_secs(1 << doublings).min(Duration::from_secs(30))
    }
}

impl RetryPolicy {
    /// True when an attempt that ended as `ending` and was attempt number `attempt` (from 1)
    /// gets another one.
    pub fn retries(&self, ending: RetryOn, attempt: u32) -> bool {
        attempt < self.max_attempts && self.retry_on.contains(&ending)
    }

    /// The wait after attempt number `attempt` (from 1) before the next, with `random` (in
    /// 0..1) deciding the jitter.
    pub fn wait_after(&self, attempt: u32, random: f64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.backoff.initial.as_secs_f64() * self.backoff.multiplier.powi(exponent);
        let capped = if base.is_finite() {
            base.min(self.backoff.max.as_secs_f64())
        } else {
            self.backoff.max.as_secs_f64()
        };
        let jittered = capped * (1.0 - self.jitter * random.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

/// Backoff as it travels: seconds, fractions allowed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BackoffWire {
    /// Seconds to wait before the second attempt (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0)))]
    pub initial: Option<f64>,
    /// Factor applied to the wait after each attempt (default 2, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 10)))]
    pub multiplier: Option<f64>,
    /// Longest wait in seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 86400)))]
    pub max: Option<f64>,
}

/// A retry policy as it travels. Everything is optional: a policy that names only
/// `max_attempts` retries every unsuccessful ending with the default backoff.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryPolicyWire {
    /// Attempts in all, the first included (default 3; 1 never retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 100)))]
    pub max_attempts: Option<u32>,
    /// Waits between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffWire>,
    /// Fraction (0 to 1) of each wait that may be randomly taken off it (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 1)))]
    pub jitter: Option<f64>,
    /// Endings that are retried (default: all three).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<RetryOn>>,
}

fn seconds(field: &str, value: f64, max: Duration) -> Result<Duration, SpecError> {
    if !value.is_finite() || value < 0.0 || value > max.as_secs_f64() {
        return Err(SpecError::new(
            field,
            format!(
                "must be 0 to {} seconds, got {value}",
                max.as_secs_f64() as u64
            ),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

impl TryFrom<RetryPolicyWire> for RetryPolicy {
    type Error = SpecError;

    fn try_from(wire: RetryPolicyWire) -> Result<Self, SpecError> {
        let max_attempts = wire.max_attempts.unwrap_or(3);
        if !(1..=limits::MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(SpecError::new(
                "retry.max_attempts",
                format!("must be 1 to {}, got {max_attempts}", limits::MAX_ATTEMPTS),
            ));
        }
        let defaults = Backoff::default();
        let wire_backoff = wire.backoff.unwrap_or_default();
        let initial = match wire_backoff.initial {
            Some(value) => seconds("retry.backoff.initial", value, limits::MAX_BACKOFF)?,
            None => defaults.initial,
        };
        let max = match wire_backoff.max {
            Some(value) => seconds("retry.backoff.max", value, limits::MAX_BACKOFF)?,
            None => defaults.max.max(initial),
        };
        if max < initial {
            return Err(SpecError::new(
                "retry.backoff.max",
                "must not be shorter than `retry.backoff.initial`",
            ));
        }
        let multiplier = wire_backoff.multiplier.unwrap_or(defaults.multiplier);
        if !multiplier.is_finite() || !(1.0..=limits::MAX_MULTIPLIER).contains(&multiplier) {
            return Err(SpecError::new(
                "retry.backoff.multiplier",
                format!("must be 1 to {}, got {multiplier}", limits::MAX_MULTIPLIER),
            ));
        }
        let jitter = wire.jitter.unwrap_or(0.2);
        if !jitter.is_finite() || !(0.0..=1.0).contains(&jitter) {
            return Err(SpecError::new(
                "retry.jitter",
                format!("must be 0 to 1, got {jitter}"),
            ));
        }
        let mut retry_on = wire.retry_on.unwrap_or_else(|| RetryOn::ALL.to_vec());
        retry_on.sort();
        retry_on.dedup();
        Ok(Self {
            max_attempts,
            backoff: Backoff {
                initial,
                multiplier,
                max,
            },
            jitter,
            retry_on,
        })
    }
}

impl From<RetryPolicy> for RetryPolicyWire {
    fn from(policy: RetryPolicy) -> Self {
        Self {
            max_attempts: Some(policy.max_attempts),
            backoff: Some(BackoffWire {
                initial: Some(policy.backoff.initial.as_secs_f64()),
                multiplier: Some(policy.backoff.multiplier),
                max: Some(policy.backoff.max.as_secs_f64()),
            }),
            jitter: Some(policy.jitter),
            retry_on: Some(policy.retry_on),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unclaimed_dispatch_waits_longer_each_time_so_its_deliveries_outlast_an_election() {
        use limits::{MAX_DISPATCH_DELIVERIES, unclaimed_dispatch_delay};
        assert_eq!(unclaimed_dispatch_delay(1), Duration::from_secs(1));
        assert_eq!(unclaimed_dispatch_delay(2), Duration::from_secs(2));
        assert_eq!(unclaimed_dispatch_delay(5), Duration::from_secs(16));
        assert_eq!(unclaimed_dispatch_delay(9), Duration::from_secs(30));
        assert_eq!(unclaimed_dispatch_delay(0), Duration::from_secs(1));
        let before_quarantine: Duration = (1..=MAX_DISPATCH_DELIVERIES)
            .map(unclaimed_dispatch_delay)
            .sum();
        assert!(
            before_quarantine >= Duration::from_secs(60),
            "{before_quarantine:?}"
        );
    }

    fn parse(json: &str) -> Result<RetryPolicy, SpecError> {
        RetryPolicy::try_from(serde_json::from_str::<RetryPolicyWire>(json).expect("parses"))
    }

    #[test]
    fn the_default_policy_retries_only_lost_attempts_up_to_three() {
        let policy = RetryPolicy::default();
        assert!(policy.retries(RetryOn::Lost, 1));
        assert!(policy.retries(RetryOn::Lost, 2));
        assert!(!policy.retries(RetryOn::Lost, 3));
        assert!(!policy.retries(RetryOn::Failed, 1));
        assert_eq!(policy.wait_after(1, 0.5), Duration::ZERO);
    }

    #[test]
    fn a_named_policy_retries_every_ending_by_default() {
        let policy = parse(r#"{"max_attempts": 4}"#).expect("valid");
        for ending in RetryOn::ALL {
            assert!(policy.retries(ending, 3), "{ending}");
            assert!(!policy.retries(ending, 4), "{ending}");
        }
    }

    #[test]
    fn waits_grow_by_the_multiplier_up_to_the_max() {
        let policy = parse(
            r#"{"max_attempts": 10, "jitter": 0,
                "backoff": {"initial": 1, "multiplier": 3, "max": 20}}"#,
        )
        .expect("valid");
        let waits: Vec<u64> = (1..=5)
            .map(|attempt| policy.wait_after(attempt, 0.9).as_secs())
            .collect();
        assert_eq!(waits, [1, 3, 9, 20, 20]);
    }

    #[test]
    fn jitter_only_shortens_a_wait_by_at_most_its_fraction() {
        let policy = parse(r#"{"jitter": 0.5, "backoff": {"initial": 10}}"#).expect("valid");
        assert_eq!(policy.wait_after(1, 0.0), Duration::from_secs(10));
        assert_eq!(policy.wait_after(1, 1.0), Duration::from_secs(5));
        let middle = policy.wait_after(1, 0.5);
        assert!(middle > Duration::from_secs(5) && middle < Duration::from_secs(10));
    }

    #[test]
    fn out_of_range_values_are_rejected_naming_the_field() {
        let field = |json: &str| parse(json).expect_err("rejected").field;
        assert_eq!(field(r#"{"max_attempts": 0}"#), "retry.max_attempts");
        assert_eq!(field(r#"{"max_attempts": 1000}"#), "retry.max_attempts");
        assert_eq!(field(r#"{"jitter": 1.5}"#), "retry.jitter");
        assert_eq!(
            field(r#"{"backoff": {"multiplier": 0.5}}"#),
            "retry.backoff.multiplier"
        );
        assert_eq!(
            field(r#"{"backoff": {"initial": -1}}"#),
            "retry.backoff.initial"
        );
        assert_eq!(
            field(r#"{"backoff": {"initial": 10, "max": 5}}"#),
            "retry.backoff.max"
        );
    }

    #[test]
    fn unknown_endings_and_fields_do_not_parse() {
        assert!(serde_json::from_str::<RetryPolicyWire>(r#"{"retry_on": ["crashed"]}"#).is_err());
        assert!(serde_json::from_str::<RetryPolicyWire>(r#"{"attempts": 3}"#).is_err());
    }
}
