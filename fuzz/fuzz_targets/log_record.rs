//! A saga log record (read by the coordinator, clients and followers): decoding never panics, and what decodes re-encodes to bytes that decode to the same.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use saga_core::wire::LogRecord;

fuzz_target!(|data: &[u8]| common::round_trip::<LogRecord>(data));
