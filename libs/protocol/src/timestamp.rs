//! Wall-clock instants on the wire: RFC 3339 text in human-readable encodings (JSON), integer
//! milliseconds since the Unix epoch in MessagePack.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// From milliseconds since the Unix epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// Parses RFC 3339 text, with any offset.
    pub fn parse_rfc3339(text: &str) -> Result<Self, time::error::Parse> {
        let at = OffsetDateTime::parse(text, &Rfc3339)?;
        Ok(Self((at.unix_timestamp_nanos() / 1_000_000) as i64))
    }

    /// RFC 3339 text in UTC with millisecond precision.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(at) => at
                .format(&Rfc3339)
                .unwrap_or_else(|_| format!("@{}ms", self.0)),
            Err(_) => format!("@{}ms", self.0),
        }
    }

    /// The time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }

    /// This instant moved forward by `duration`.
    pub fn plus(self, duration: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// `duration` earlier.
    pub fn minus(self, duration: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl From<SystemTime> for Timestamp {
    fn from(at: SystemTime) -> Self {
        match at.duration_since(UNIX_EPOCH) {
            Ok(elapsed) => Self(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)),
            Err(before) => Self(-i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_rfc3339())
        } else {
            serializer.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            Self::parse_rfc3339(&text).map_err(|e| {
                serde::de::Error::custom(format_args!("`{text}` is not an RFC 3339 time: {e}"))
            })
        } else {
            i64::deserialize(deserializer).map(Self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_at_millisecond_precision() {
        let at = Timestamp::from_millis(1_700_000_000_123);
        assert_eq!(at.to_rfc3339(), "2023-11-14T22:13:20.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&at.to_rfc3339()), Ok(at));
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let at = Timestamp::parse_rfc3339("2023-11-15T00:13:20.123+02:00").expect("valid time");
        assert_eq!(at, Timestamp::from_millis(1_700_000_000_123));
    }

    #[test]
    fn json_carries_text_and_msgpack_carries_integers() {
        let at = Timestamp::from_millis(1_700_000_000_123);
        let json = serde_json::to_string(&at).expect("serializes");
        assert_eq!(json, "\"2023-11-14T22:13:20.123Z\"");
        let packed = rmp_serde::to_vec_named(&at).expect("serializes");
        assert_eq!(
            rmp_serde::from_slice::<Timestamp>(&packed).expect("decodes"),
            at
        );
        assert!(
            packed.len() <= 9,
            "an integer, not text: {} bytes",
            packed.len()
        );
    }
}
