#![no_main]
//! The token parser: never panics; whatever parses prints back to the same text.
use libfuzzer_sys::fuzz_target;
use matrix_refresh_proxy::ProxyToken;

fuzz_target!(|s: &str| {
    if let Ok(t) = ProxyToken::parse(s) {
        assert_eq!(t.expose(), s);
        let _ = t.lookup_id();
    }
});
