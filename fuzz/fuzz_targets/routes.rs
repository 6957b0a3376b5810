#![no_main]
//! The path classifier: never panics on any method and path.
use libfuzzer_sys::fuzz_target;
use matrix_refresh_proxy::matrix::routes::classify;

fuzz_target!(|input: (u8, &str)| {
    let (m, path) = input;
    let method = ["GET", "POST", "PUT", "DELETE", "OPTIONS"][usize::from(m % 5)];
    let _ = classify(method, path);
});
