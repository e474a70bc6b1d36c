//! An effect record (read by a participant from its own bucket): decoding never panics, and
//! what decodes re-encodes to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saga_core::wire::EffectRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = rmp_serde::from_slice::<EffectRecord>(data) {
        let bytes = rmp_serde::to_vec_named(&record).expect("a decoded record encodes");
        let again: EffectRecord = rmp_serde::from_slice(&bytes).expect("it decodes again");
        assert_eq!(again, record);
    }
});
