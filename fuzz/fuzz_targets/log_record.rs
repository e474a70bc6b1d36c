//! A saga log record (read by the coordinator, clients and followers): decoding never panics, and what decodes re-encodes to bytes that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saga_core::wire::LogRecord;
use saga_core::Codec;

fuzz_target!(|data: &[u8]| {
    let codec = Codec::default();
    if let Ok(msg) = codec.decode::<LogRecord>(data) {
        let bytes = codec.encode(&msg).expect("a decoded message encodes");
        let again: LogRecord = codec.decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
});
