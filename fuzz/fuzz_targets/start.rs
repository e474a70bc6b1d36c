//! A start (client to coordinator): decoding never panics, and what decodes re-encodes to bytes that decode to the same.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use saga_core::wire::StartMessage;

fuzz_target!(|data: &[u8]| common::round_trip::<StartMessage>(data));
