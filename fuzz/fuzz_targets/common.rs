//! What every message target checks: decoding never panics, and what decodes re-encodes to
//! bytes that decode to the same message.

use saga_core::wire::WireMessage;
use saga_core::Codec;

pub fn round_trip<T: WireMessage + std::fmt::Debug>(data: &[u8]) {
    let codec = Codec::default();
    if let Ok(msg) = codec.decode::<T>(data) {
        let bytes = codec.encode(&msg).expect("a decoded message encodes");
        let again: T = codec.decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
}
