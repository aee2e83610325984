//! The node's slots: one per process that may run at once. Two pulls offer them to JetStream
//! (the node's dispatches and the shared submissions), each asking for as many messages as
//! there are free slots beyond what it has asked for already; a message takes a slot when it
//! arrives. A slot given back wakes both pulls, so a freed slot is offered at once.

use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The slots of one node.
pub(crate) struct Slots {
    free: Arc<Semaphore>,
    changed: Arc<Notify>,
}

/// One slot, held while a process runs; given back when dropped.
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    changed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.changed.notify_waiters();
    }
}

impl Slots {
    /// `capacity` slots, all free.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            free: Arc::new(Semaphore::new(capacity)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// How many slots are free now.
    pub(crate) fn free(&self) -> usize {
        self.free.available_permits()
    }

    /// A free slot, if there is one.
    pub(crate) fn try_take(&self) -> Option<Slot> {
        let permit = self.free.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// The next slot to be free.
    pub(crate) async fn take(&self) -> Slot {
        let permit = self
            .free
            .clone()
            .acquire_owned()
            .await
            .expect("the slots are never closed");
        self.slot(permit)
    }

    /// Resolves at the next change: a slot given back, or [`Slots::changed`] called.
    pub(crate) fn on_change(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Wakes whoever waits in [`Slots::on_change`] (a pull asks for fewer messages now).
    pub(crate) fn changed(&self) {
        self.changed.notify_waiters();
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            changed: self.changed.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_given_back_is_free_again_and_wakes_whoever_waits_for_a_change() {
        let slots = Slots::new(2);
        let first = slots.try_take().expect("a free slot");
        let second = slots.try_take().expect("a free slot");
        assert!(slots.try_take().is_none(), "both are taken");
        assert_eq!(slots.free(), 0);
        let changed = slots.on_change();
        tokio::pin!(changed);
        changed.as_mut().enable();
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), changed)
            .await
            .expect("woken by the slot given back");
        assert_eq!(slots.free(), 1);
        drop(second);
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), slots.take())
            .await
            .expect("a free slot");
        assert_eq!(slots.free(), 1);
        drop(again);
        assert_eq!(slots.free(), 2);
    }
}
