//! The request decoder on arbitrary bytes: it never panics, a body it
//! accepts is within the size limit, and an accepted request encodes to
//! JSON that decodes to the same request (so what amends records of a
//! request is what it decided on).
#![no_main]

use amends_core::partition::Input;
use amends_core::wire::{self, REQUEST_BYTES_MAX, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match decode_request(bytes) {
        Ok(Input::Request(request)) => {
            assert!(bytes.len() <= REQUEST_BYTES_MAX);
            let encoded = wire::encode(&request);
            match decode_request(&encoded) {
                Ok(Input::Request(again)) => assert_eq!(again, request),
                other => panic!("re-encoded request not accepted: {other:?}"),
            }
        }
        Ok(Input::Malformed { detail, .. }) => assert!(!detail.is_empty()),
        Err(unreadable) => assert!(!unreadable.detail.is_empty()),
    }
});
