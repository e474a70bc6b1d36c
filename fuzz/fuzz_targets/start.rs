//! A start (client to coordinator): decoding never panics, and what decodes re-encodes to bytes that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saga_core::wire::StartMessage;
use saga_core::Codec;

fuzz_target!(|data: &[u8]| {
    let codec = Codec::default();
    if let Ok(msg) = codec.decode::<StartMessage>(data) {
        let bytes = codec.encode(&msg).expect("a decoded message encodes");
        let again: StartMessage = codec.decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
});
