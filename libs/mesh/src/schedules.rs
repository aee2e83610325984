//! Arming a schedule's next tick: one message scheduled on the server for the tick's time
//! (`capstan.timers.schedule.<name>`), which it fires onto `capstan.timers.tick.<name>`. Arming
//! again replaces it, and the deduplication id names the schedule, generation and time, so
//! the API and any number of schedulers may arm the same tick.

use bytes::Bytes;
use capstan_protocol::schedule::Tick;
use capstan_protocol::{codec, subjects};

use crate::connect::Mesh;
use crate::error::Error;
use crate::lifecycle::{Due, publish_due};
use crate::wire::msgpack_headers;

/// Arms `tick` and waits until the server has stored it.
pub async fn arm(mesh: &Mesh, tick: &Tick) -> Result<(), Error> {
    let mut map = msgpack_headers();
    capstan_telemetry::propagation::inject(&mut map);
    let payload = Bytes::from(codec::to_msgpack(tick)?);
    let due = Due {
        at: tick.at,
        set: subjects::schedule_timer(&tick.schedule),
        fired: subjects::schedule_tick(&tick.schedule),
        message_id: tick.message_id(),
    };
    publish_due(mesh, due, map, payload, "schedule tick").await
}
