//! Joining spawned tasks. A task that panicked raises its panic again where it is joined, so a
//! bug ends the service the way it would have without the spawn, never as a clean stop; a task
//! that was cancelled (aborted, or its runtime shutting down) has nothing to report. Spawning
//! and deciding when to join stay with the services.

use tokio::task::JoinError;

/// What a joined task returned, or `None` when it was cancelled before it finished. A panic in
/// the task is resumed here, with the task's own payload.
pub fn joined<T>(result: Result<T, JoinError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use super::*;

    #[tokio::test]
    async fn a_task_that_finished_gives_its_output() {
        let result = tokio::spawn(async { 7 }).await;
        assert_eq!(joined(result), Some(7));
    }

    #[tokio::test]
    async fn a_panic_in_a_task_is_raised_again_where_it_is_joined() {
        let result = tokio::spawn(async { panic!("the task's own words") }).await;
        let raised = std::panic::catch_unwind(AssertUnwindSafe(|| joined::<()>(result)))
            .expect_err("the panic surfaces");
        assert_eq!(raised.downcast_ref::<&str>(), Some(&"the task's own words"));
    }

    #[tokio::test]
    async fn a_cancelled_task_has_nothing_to_report() {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        assert_eq!(joined(task.await), None);
    }
}
