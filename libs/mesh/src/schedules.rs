//! Arming a schedule's next tick: one message scheduled on the server for the tick's time
//! (`capstan.timers.schedule.<name>`), which it fires onto `capstan.timers.tick.<name>`. Arming
//! again replaces it, and the deduplication id names the schedule, generation and time, so
//! the API and any number of schedulers may arm the same tick.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use capstan_protocol::schedule::Tick;
use capstan_protocol::{Timestamp, codec, headers, subjects};

use crate::connect::Mesh;
use crate::error::Error;
use crate::wire::msgpack_headers;

/// A tick due this close to now is published as fired at once rather than scheduled.
const IMMEDIATE: Duration = Duration::from_millis(20);

/// Arms `tick` and waits until the server has stored it.
pub async fn arm(mesh: &Mesh, tick: &Tick) -> Result<(), Error> {
    let mut map = msgpack_headers();
    capstan_telemetry::propagation::inject(&mut map);
    let payload = Bytes::from(codec::to_msgpack(tick)?);
    let subject = if tick.at <= Timestamp::now().plus(IMMEDIATE) {
        subjects::schedule_tick(&tick.schedule)
    } else {
        let schedule = tick.schedule_header();
        let target = subjects::schedule_tick(&tick.schedule);
        map.insert(headers::SCHEDULE, schedule.as_str());
        map.insert(headers::SCHEDULE_TARGET, target.as_str());
        subjects::schedule_timer(&tick.schedule)
    };
    let publish = PublishMessage::build()
        .payload(payload)
        .headers(map)
        .message_id(tick.message_id());
    mesh.js
        .send_publish(subject, publish)
        .await
        .map_err(|e| Error::unavailable("schedule tick", e))?
        .await
        .map_err(|e| Error::unavailable("schedule tick", e))?;
    Ok(())
}
