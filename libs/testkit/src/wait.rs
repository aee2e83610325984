//! Waiting for a condition with a deadline: the only way tests wait for asynchronous effects.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is probed.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Probes until `probe` returns `Some`, and returns its value; panics naming `what` when
/// `timeout` passes first. Pick generous timeouts: the probe returns as soon as it can.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
