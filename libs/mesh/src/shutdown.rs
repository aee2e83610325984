//! Graceful shutdown: one token, cancelled by SIGTERM or SIGINT, that every task watches; and
//! [`Stop`], which also stops a service's tasks when one of them fails for good.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// A token cancelled on the first SIGTERM or SIGINT. Must be called inside a tokio runtime.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        cancel.cancel();
    });
    token
}

/// How a service's tasks stop together: on a signal (the parent token), or when one of them
/// fails for good — then the others stop too, and the service reports that first failure
/// instead of carrying on without the part that failed.
#[derive(Clone, Debug)]
pub struct Stop {
    token: CancellationToken,
    failure: Arc<Mutex<Option<Error>>>,
}

impl Stop {
    /// A stop cancelled with `parent`, or by [`Stop::fail`].
    pub fn new(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            failure: Arc::default(),
        }
    }

    /// The token every task watches.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Stops every task because of `error`. The first failure is the one reported; a task that
    /// ends because the service is already stopping ([`Error::ShuttingDown`]) is not a failure.
    pub fn fail(&self, error: Error) {
        if matches!(error, Error::ShuttingDown) {
            return;
        }
        tracing::error!(error = %error, "stopping the service");
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(error);
        self.token.cancel();
    }

    /// Runs `task`, stopping every task if it fails.
    pub async fn watch(&self, task: impl Future<Output = Result<(), Error>>) {
        if let Err(error) = task.await {
            self.fail(error);
        }
    }

    /// The first failure, if any task failed; `Ok` when the service stopped on a signal.
    pub fn outcome(&self) -> Result<(), Error> {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_is_reported() {
        let parent = CancellationToken::new();
        let stop = Stop::new(&parent);
        let other = {
            let token = stop.token().clone();
            tokio::spawn(async move { token.cancelled().await })
        };
        stop.watch(async { Err(Error::setup("consumer scheduler", "refused")) })
            .await;
        tokio::time::timeout(std::time::Duration::from_secs(5), other)
            .await
            .expect("the other task stopped")
            .expect("the other task joins");
        assert!(!parent.is_cancelled(), "a failure stops this service only");
        let outcome = stop.outcome();
        assert!(
            matches!(&outcome, Err(Error::Setup { what, .. }) if what == "consumer scheduler"),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_signal_is_not_a_failure() {
        let parent = CancellationToken::new();
        let stop = Stop::new(&parent);
        parent.cancel();
        assert!(stop.token().is_cancelled());
        stop.watch(async { Err(Error::ShuttingDown) }).await;
        assert!(stop.outcome().is_ok());
    }
}
