#![no_main]
//! Credential extraction and query rewriting: never panic.
use libfuzzer_sys::fuzz_target;
use matrix_refresh_proxy::upstream::credentials::{presented, rewrite_query, strip_proxy_tokens};

fuzz_target!(|input: (&[u8], &str)| {
    let (auth, query) = input;
    let mut h = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(auth) {
        h.insert(http::header::AUTHORIZATION, v);
    }
    let _ = presented(&h, Some(query));
    let _ = rewrite_query(query, |t| Some(t.to_owned()));
    let _ = strip_proxy_tokens(&mut h, Some(query));
});
