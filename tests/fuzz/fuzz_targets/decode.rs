//! Any bytes: the decoder returns an event or an error naming a field; it never panics, and
//! its memory stays bounded (the body limit and serde_json's recursion limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portals_crm::event::{DEFAULT_MAX_BODY_BYTES, decode};

fuzz_target!(|data: &[u8]| {
    if let Err(error) = decode(data, DEFAULT_MAX_BODY_BYTES) {
        assert!(!error.field.is_empty());
    }
});
