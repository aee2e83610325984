//! Placing jobs that waited for room, dispatching, and following job events to know when
//! room appears.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use capstan_mesh::{BucketView, Change, Error, Modified, Versioned, wire};
use capstan_protocol::subjects;
use capstan_protocol::{
    Dispatch, Encoding, JobEvent, JobEventKind, JobId, JobRecord, NodeId, NodeRecord, Timestamp,
    codec, headers,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Scheduler;
use crate::waiting::Held;

impl Scheduler {
    /// Publishes the dispatch of `record`'s current attempt to its node, deduplicated by
    /// `<job>.<attempt>`, and waits until the stream holds it.
    pub(crate) async fn dispatch(&self, record: &JobRecord, revision: u64) -> Result<(), Error> {
        let node = record
            .node
            .as_ref()
            .expect("a dispatched record names its node");
        let dispatch = Dispatch {
            record: record.clone(),
            revision,
        };
        let mut map = wire::msgpack_headers();
        map.insert(headers::JOB_ID, record.id.to_string().as_str());
        map.insert(headers::ATTEMPT, record.attempt.to_string().as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let publish = PublishMessage::build()
            .payload(Bytes::from(codec::to_msgpack(&dispatch)?))
            .headers(map)
            .message_id(dispatch.message_id());
        let started = std::time::Instant::now();
        self.mesh
            .js
            .send_publish(subjects::dispatch(node), publish)
            .await
            .map_err(|e| Error::unavailable("dispatch", e))?
            .await
            .map_err(|e| Error::unavailable("dispatch", e))?;
        capstan_mesh::metrics::mesh().request("dispatch", started);
        // A running attempt dispatched again (taken from its submission, now held by its
        // node's dispatches) was placed long ago.
        if record.attempt == 1 && record.status != capstan_protocol::JobStatus::Running {
            crate::metrics::scheduler()
                .placed(capstan_protocol::Timestamp::now().since(record.created_at));
        }
        Ok(())
    }

    /// Follows job events (every replica's) to count assignments and notice ended jobs: only
    /// the kinds that assign a node or end a job, not `running`.
    pub(crate) async fn follow_events(self: Arc<Self>, shutdown: CancellationToken) {
        use capstan_protocol::JobEventKind as Kind;
        let mut streams = Vec::new();
        for kind in [Kind::Pending, Kind::Dispatched]
            .into_iter()
            .chain(Kind::attempt_ends())
        {
            match self
                .mesh
                .client
                .subscribe(subjects::job_events_of_kind(kind))
                .await
            {
                Ok(subscriber) => streams.push(subscriber),
                Err(error) => {
                    tracing::error!(error = %error, "cannot follow job events; relying on heartbeats");
                    return;
                }
            }
        }
        let mut events = futures::stream::select_all(streams);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            let Some(event) = event else { return };
            let Some((job, kind)) = subjects::parse_job_event(&event.subject) else {
                continue;
            };
            // Headers carry what is needed here; no need to decode the body.
            let node = wire::header(event.headers.as_ref(), headers::NODE)
                .and_then(|text| text.parse::<NodeId>().ok());
            let attempt = wire::header(event.headers.as_ref(), headers::ATTEMPT)
                .and_then(|text| text.parse::<u32>().ok());
            match kind {
                "pending" | "dispatched" | "running" => {
                    if let Some(node) = node {
                        self.cluster.observe_assigned(node, job, attempt);
                    }
                }
                kind if kind.parse::<Kind>().is_ok_and(Kind::ends_attempt) => {
                    self.cluster.observe_finished(node.as_ref(), job, attempt);
                    self.wake.notify_one();
                    // A fan-out target's job: its parent decides what comes next; a
                    // workflow step's job: its workflow does.
                    let parent = wire::header(event.headers.as_ref(), headers::FANOUT)
                        .and_then(|text| text.parse::<JobId>().ok());
                    let workflow = wire::header(event.headers.as_ref(), headers::WORKFLOW)
                        .and_then(|text| text.parse::<JobId>().ok());
                    if parent.is_some() || workflow.is_some() {
                        match codec::decode::<JobEvent>(Encoding::MsgPack, &event.payload) {
                            Ok(decoded) => {
                                if let Some(parent) = parent {
                                    self.fanouts.heard(parent, decoded.record.clone());
                                }
                                if let Some(workflow) = workflow {
                                    self.workflows.heard(workflow, decoded.record);
                                }
                            }
                            Err(error) => {
                                tracing::debug!(error = %error, "undecodable job event")
                            }
                        }
                    }
                    // A job under a concurrency limit: its slot is free again.
                    if let Some(key) =
                        wire::header(event.headers.as_ref(), headers::CONCURRENCY_KEY)
                    {
                        let (scheduler, key) = (self.clone(), key.to_owned());
                        tokio::spawn(async move { scheduler.release_slot(&key, job).await });
                    }
                    // A schedule's run: a run queued behind it may start now.
                    if let Some(schedule) =
                        wire::header(event.headers.as_ref(), headers::SCHEDULE_NAME)
                    {
                        let (scheduler, schedule) = (self.clone(), schedule.to_owned());
                        tokio::spawn(async move {
                            let submitter = capstan_mesh::Submitter::new(
                                scheduler.mesh.js.clone(),
                                scheduler.mesh.idempotency.clone(),
                            );
                            if let Err(error) = scheduler.start_queued(&submitter, &schedule).await
                            {
                                tracing::debug!(schedule = %schedule, error = %error, "cannot start a queued run; the next tick will");
                            }
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// Places waiting jobs whenever room may have appeared, keeps their held submissions alive,
    /// and reconciles the assignment counts with heartbeats.
    pub(crate) async fn place_waiting(
        self: Arc<Self>,
        nodes: BucketView<NodeRecord>,
        shutdown: CancellationToken,
    ) {
        let node_changes = nodes.changed();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Waiting submissions come from both consumers: kept alive for the shorter ack wait.
        let progress_every = self.config.ack_wait.min(self.config.submission_ack_wait) / 3;
        // Waiting jobs' creations are announced within a quarter of `--announce-after` of
        // falling due.
        let announce_every = self.config.announce_after / 4;
        let mut announce = tokio::time::interval(announce_every.max(Duration::from_millis(1)));
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = announce.tick(), if !announce_every.is_zero() => {
                    self.announce_waiting();
                    continue;
                }
                _ = self.wake.notified() => {}
                _ = node_changes.notified() => {}
                _ = tick.tick() => {
                    self.cluster.reconcile();
                    for reply in self.waiting.due_for_progress(progress_every) {
                        let client = self.mesh.client.clone();
                        tokio::spawn(async move {
                            let _ = client.publish(reply, Bytes::from_static(b"+WPI")).await;
                        });
                    }
                }
            }
            for (held, node) in self.waiting.take_placeable(&self.cluster) {
                let scheduler = self.clone();
                tokio::spawn(async move { scheduler.place_held(held, node).await });
            }
        }
    }

    /// Publishes the `pending` event of each job that has waited long enough for room
    /// ([`crate::waiting::Waiting::due_announcements`]), in the job's trace.
    fn announce_waiting(self: &Arc<Self>) {
        for record in self.waiting.due_announcements(std::time::Instant::now()) {
            let span = tracing::info_span!("announce waiting job", job_id = %record.id);
            capstan_telemetry::propagation::follow_traceparent(
                &span,
                record.traceparent.as_deref(),
            );
            let scheduler = self.clone();
            let announce = async move {
                let event = JobEvent::new(JobEventKind::Pending, &record);
                if let Err(error) = scheduler.mesh.events.job(&event).await {
                    tracing::warn!(job = %record.id, error = %error, "cannot announce a waiting job");
                }
            };
            tokio::spawn(announce.instrument(span));
        }
    }

    /// Places a waiting job on `node` (already reserved for it).
    async fn place_held(self: &Arc<Self>, held: Held, node: NodeId) {
        let span = tracing::info_span!(
            "place waiting job",
            otel.kind = "consumer",
            job_id = %held.job,
            node = %node,
        );
        capstan_telemetry::propagation::follow(&span, held.message.headers.as_ref());
        self.place_held_in_span(held, node).instrument(span).await;
    }

    async fn place_held_in_span(self: &Arc<Self>, mut held: Held, node: NodeId) {
        let outcome = if held.timer.is_none()
            && let Some(known) = held.known.as_ref()
            && known.value.is_unplaced()
        {
            self.place_unplaced(known, &node).await.map(|()| true)
        } else {
            self.place_by_record(&mut held, &node).await
        };
        match outcome {
            Ok(placed) => {
                if !placed {
                    self.cluster.release(&node, held.job);
                }
                if let Err(error) = held.message.ack().await {
                    tracing::warn!(job = %held.job, error = %error, "cannot acknowledge submission");
                }
                tracing::debug!(job = %held.job, node = %node, placed, "waiting job handled");
            }
            Err(error) => {
                self.cluster.release(&node, held.job);
                tracing::warn!(job = %held.job, error = %error, "cannot place waiting job, will retry");
                self.waiting.push_front(held);
            }
        }
    }

    /// Places a new job whose record is as its creation wrote it, writing nothing: the dispatch
    /// carries the record assigned to `node` over the revision of the unplaced one, and the
    /// executor's claim writes both at once. A record changed meanwhile (cancelled) fails that
    /// claim, and the dispatch is dropped unrun.
    async fn place_unplaced(
        self: &Arc<Self>,
        known: &Versioned<JobRecord>,
        node: &NodeId,
    ) -> Result<(), Error> {
        let assigned = known.value.assigned(node.clone(), Timestamp::now());
        self.dispatch(&assigned, known.revision).await?;
        self.announce_placed(JobEventKind::Dispatched, assigned);
        Ok(())
    }

    /// Places `held` by writing its assignment to the record: from the record as known here when
    /// it is (no read before the write), read first otherwise; a record changed meanwhile is
    /// read and decided on again. False when there was nothing to place.
    async fn place_by_record(
        self: &Arc<Self>,
        held: &mut Held,
        node: &NodeId,
    ) -> Result<bool, Error> {
        let key = held.job.to_string();
        let known = held.known.take();
        let timer = held.timer;
        let decide = |current: Option<&Versioned<JobRecord>>| {
            let Some(current) = current else {
                // Created, then expired or removed.
                return Change::Stop(None);
            };
            let record = &current.value;
            let placeable = match timer {
                Some(attempt) => record.awaits_timer(attempt),
                None => record.is_unplaced(),
            };
            if placeable {
                Change::Write(record.assigned(node.clone(), Timestamp::now()))
            } else {
                Change::Stop(Some(current.clone()))
            }
        };
        let modified = match known {
            Some(known) => {
                self.mesh
                    .jobs
                    .modify_from(&key, Some(known), decide)
                    .await?
            }
            None => self.mesh.jobs.modify(&key, decide).await?,
        };
        let assigned = match modified {
            Modified::Written { written, .. } => written,
            Modified::Stopped(None) => return Ok(false),
            Modified::Stopped(Some(current)) => {
                // The attempt this held message asked for was placed already: by an earlier try
                // here whose dispatch publish failed after the record was written, or by another
                // replica. Publishing its dispatch again is harmless (deduplicated by
                // `<job>.<attempt>`, and a claimed attempt is not claimed twice); skipping it
                // could leave the job assigned with no dispatch to run it.
                let record = &current.value;
                let ours = timer.is_none_or(|attempt| record.attempt == attempt + 1);
                if record.is_dispatched() && ours {
                    if let Some(assigned) = &record.node {
                        self.cluster.observe_assigned(
                            assigned.clone(),
                            record.id,
                            Some(record.attempt),
                        );
                    }
                    self.dispatch(record, current.revision).await?;
                }
                // Otherwise it was cancelled or ended meanwhile.
                return Ok(false);
            }
        };
        self.dispatch(&assigned.value, assigned.revision).await?;
        self.announce_placed(JobEventKind::Dispatched, assigned.value);
        Ok(true)
    }

    /// Publishes the `kind` event (`pending` for a job placed as it was created, `dispatched`
    /// for one placed after waiting) of a placed job once it has gone `announce_after` without
    /// ending (at once when that is zero). A job that ends sooner is announced by its outcome
    /// alone, whose record names its node. Replicas count one another's placements from this
    /// event; the heartbeats correct what they have not seen yet.
    ///
    /// A `pending` waits half as long: the executor announces the attempt's start once the
    /// process has run `announce_after`, and the job's creation must come before its start.
    pub(crate) fn announce_placed(self: &Arc<Self>, kind: JobEventKind, record: JobRecord) {
        let scheduler = self.clone();
        let announce = async move {
            let wait = match kind {
                JobEventKind::Pending => scheduler.config.announce_after / 2,
                _ => scheduler.config.announce_after,
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                let Some(node) = &record.node else { return };
                if !scheduler.cluster.is_assigned(node, record.id) {
                    return;
                }
            }
            let event = JobEvent::new(kind, &record);
            if let Err(error) = scheduler.mesh.events.job(&event).await {
                tracing::warn!(job = %record.id, error = %error, "cannot announce placement");
            }
        };
        tokio::spawn(announce.in_current_span());
    }

    /// Hands every waiting job back to JetStream so another replica can take it at once.
    pub(crate) async fn hand_back_waiting(&self) {
        let held = self.waiting.drain();
        if !held.is_empty() {
            tracing::info!(jobs = held.len(), "handing waiting jobs back");
        }
        for held in held {
            let _ = held.message.ack_with(AckKind::Nak(None)).await;
        }
    }
}
