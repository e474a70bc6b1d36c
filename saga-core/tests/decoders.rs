//! Property tests of every decoder of untrusted input: arbitrary bytes, and the conformance
//! vectors with bytes flipped, inserted, deleted or cut, never panic a decoder; whatever
//! decodes passes the codec's checks (tokens, sizes) and re-encodes to bytes that decode to
//! the same message. `scripts/fuzz` runs the same decoders under libFuzzer for longer.
//! The number of cases follows `PROPTEST_CASES`.

use proptest::prelude::*;
use proptest::test_runner::Config;
use saga_core::wire::{
    CommandMessage, EffectRecord, LogRecord, OperatorMessage, ReplyMessage, StartMessage,
    WireMessage,
};
use saga_core::{Codec, SagaDefinition};

fn config() -> Config {
    Config { failure_persistence: None, ..Config::default() }
}

/// The conformance vectors' messages: `(kind, bytes)`.
fn vectors() -> Vec<(String, Vec<u8>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors/saga-paths.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("vectors")).expect("json");
    json.as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            let hex: String = v["hex"].as_str().unwrap().split_whitespace().collect();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (v["kind"].as_str().unwrap().to_owned(), bytes)
        })
        .collect()
}

/// Decodes `bytes` as `T`; if it decodes, it must re-encode and decode to the same.
fn round_trip<T: WireMessage + std::fmt::Debug>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let codec = Codec::default();
    if let Ok(msg) = codec.decode::<T>(bytes) {
        let again = codec.encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: T = codec.decode(&again).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(format!("{back:?}"), format!("{msg:?}"));
    }
    Ok(())
}

/// Every decoder, on the same bytes.
fn every_decoder(bytes: &[u8]) -> Result<(), TestCaseError> {
    round_trip::<StartMessage>(bytes)?;
    round_trip::<OperatorMessage>(bytes)?;
    round_trip::<CommandMessage>(bytes)?;
    round_trip::<ReplyMessage>(bytes)?;
    round_trip::<LogRecord>(bytes)?;
    if let Ok(record) = saga_core::wire::decode_nested::<EffectRecord>(bytes) {
        let again = rmp_serde::to_vec_named(&record).unwrap();
        prop_assert_eq!(saga_core::wire::decode_nested::<EffectRecord>(&again).unwrap(), record);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        for def in
            [SagaDefinition::from_json(text), SagaDefinition::from_yaml(text)].into_iter().flatten()
        {
            let _ = def.validate();
        }
    }
    Ok(())
}

/// A change to a message: flip, insert or delete a byte, or cut the message short.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Cut(usize),
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(at, x) if !bytes.is_empty() => bytes[at % len] ^= x.max(1),
            Mutation::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Mutation::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at % len);
            }
            Mutation::Cut(at) => bytes.truncate(at % len),
            _ => {}
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Insert(a, b)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Cut),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        every_decoder(&bytes)?;
    }

    #[test]
    fn damaged_vectors_never_panic_a_decoder(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let all = vectors();
        let (_, bytes) = &all[which.index(all.len())];
        every_decoder(&mutate(bytes.clone(), &mutations))?;
    }
}

/// What decodes from a damaged message still holds tokens where tokens belong: the codec's
/// checks run on every decode, not only on well-formed input.
/// Every conformance vector with one more field, an array nested far deeper than a decoder
/// may follow (decoders skip unknown fields by recursion), and that array alone: refused by
/// every decoder, none of which overflows its stack.
#[test]
fn hostile_nesting_never_overflows_a_decoder() {
    let deep: Vec<u8> = std::iter::repeat_n(0x91, 100_000).chain([0xc0]).collect();
    every_decoder(&deep).unwrap();
    let mut checked = 0;
    for (kind, bytes) in vectors() {
        // A map of up to 15 entries (fixmap, 0x80..=0x8e): one entry more.
        let (0x80..=0x8e) = bytes[0] else { continue };
        let mut hostile = vec![bytes[0] + 1];
        hostile.extend(&bytes[1..]);
        hostile.extend([0xa5]);
        hostile.extend(b"extra");
        hostile.extend(&deep);
        every_decoder(&hostile).unwrap();
        let codec = Codec::default();
        let err = match kind.as_str() {
            "start" => codec.decode::<StartMessage>(&hostile).map(drop).unwrap_err().to_string(),
            "operator" => {
                codec.decode::<OperatorMessage>(&hostile).map(drop).unwrap_err().to_string()
            }
            "command" => {
                codec.decode::<CommandMessage>(&hostile).map(drop).unwrap_err().to_string()
            }
            "reply" => codec.decode::<ReplyMessage>(&hostile).map(drop).unwrap_err().to_string(),
            "log_record" => codec.decode::<LogRecord>(&hostile).map(drop).unwrap_err().to_string(),
            "effect_record" => saga_core::wire::decode_nested::<EffectRecord>(&hostile)
                .map(drop)
                .unwrap_err()
                .to_string(),
            other => panic!("a vector of unknown kind {other}"),
        };
        assert!(err.contains("depth limit exceeded"), "{kind}: {err}");
        checked += 1;
    }
    assert_eq!(checked, 15, "every vector is a small map");
}

#[test]
fn decoded_damage_still_passes_the_token_checks() {
    let codec = Codec::default();
    let mut decoded = 0;
    for (kind, bytes) in vectors() {
        for at in 0..bytes.len() {
            for x in [0x01u8, 0x20, 0x80] {
                let mut damaged = bytes.clone();
                damaged[at] ^= x;
                if kind == "command" {
                    if let Ok(cmd) = codec.decode::<CommandMessage>(&damaged) {
                        decoded += 1;
                        for (field, value) in [
                            ("saga_id", cmd.saga_id.as_str()),
                            ("step", cmd.step.as_str()),
                            ("service", cmd.service.as_str()),
                        ] {
                            assert!(saga_core::check_token(value).is_ok(), "{field} {value:?}");
                        }
                    }
                }
            }
        }
    }
    assert!(decoded > 0, "no damaged command decoded: the check above would be vacuous");
}
