#![no_main]
//! The path classifier: never panics on any method and path.
use libfuzzer_sys::fuzz_target;
use matrix_refresh_proxy::http::routes::classify;

fuzz_target!(|input: (u8, &str)| {
    let (m, path) = input;
    let method = match m % 5 {
        0 => http::Method::GET,
        1 => http::Method::POST,
        2 => http::Method::PUT,
        3 => http::Method::DELETE,
        _ => http::Method::OPTIONS,
    };
    let _ = classify(&method, path);
});
