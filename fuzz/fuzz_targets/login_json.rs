#![no_main]
//! /login and /register interception: never panics, strips exactly the two flags.
use libfuzzer_sys::fuzz_target;
use matrix_refresh_proxy::matrix::login::take_flags;

fuzz_target!(|data: &[u8]| {
    if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(data) {
        if take_flags(&mut obj).is_ok() {
            assert!(!obj.contains_key("refresh_token"));
            assert!(!obj.contains_key("org.matrix.msc2918.refresh_token"));
        }
    }
});
