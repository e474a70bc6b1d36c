//! A saga definition (YAML, TOML or JSON, from a file or the registry): parsing and validation
//! never panic, and a definition that validates has a stable digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saga_core::SagaDefinition;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for parsed in [
        SagaDefinition::from_json(text),
        SagaDefinition::from_yaml(text),
        SagaDefinition::from_toml(text),
    ] {
        if let Ok(def) = parsed {
            if let Ok(plan) = def.validate() {
                let again = def.validate().expect("validates twice");
                assert_eq!(plan.digest(), again.digest());
            }
        }
    }
});
