//! Reading and writing Capstan messages on NATS: headers, encodings, sizes.

use async_nats::HeaderMap;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::{DecodeError, headers};
use serde::de::DeserializeOwned;

/// A header's value, if present.
pub fn header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    map.and_then(|map| map.get(name))
        .map(|value| value.as_str())
}

/// Decodes a message body in the encoding its `Content-Type` names, or the sniffed one.
pub fn decode<T: DeserializeOwned>(
    map: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<(T, Encoding), DecodeError> {
    codec::decode_detected(header(map, headers::CONTENT_TYPE), payload)
}

/// The encoding of a message body.
pub fn encoding_of(map: Option<&HeaderMap>, payload: &[u8]) -> Encoding {
    Encoding::detect(header(map, headers::CONTENT_TYPE), payload)
}

/// Headers of a MessagePack body.
pub fn msgpack_headers() -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(headers::CONTENT_TYPE, Encoding::MSGPACK_CONTENT_TYPE);
    map
}

/// Text made safe for a header value: one line, at most 240 bytes.
pub fn header_text(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 240 {
        let mut cut = 237;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_is_one_bounded_line() {
        assert_eq!(header_text("a\nb\r\nc"), "a b  c");
        let long = "é".repeat(500);
        let cut = header_text(&long);
        assert!(cut.len() <= 240 && cut.ends_with("..."));
    }
}
