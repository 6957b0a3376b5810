//! Which client a request comes from, for rate limits (DESIGN.md §3).
//!
//! The TCP peer, unless the peer is a configured trusted proxy: then the right-most address of
//! `X-Forwarded-For` that is not itself trusted. Everything left of that address was written by
//! the client and is ignored, so a client cannot choose its own identity, and a spoofed header
//! from an untrusted peer changes nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;

use crate::config::TrustedProxies;

/// One `X-Forwarded-For` element: an address, optionally with a port or in brackets.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

/// The client address for rate limiting; see the module documentation.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        hint_missing_trust(peer, headers);
        return peer;
    }
    // Headers in order, each a comma-separated list; walked from the right (the nearest hop).
    // An element that is not an address (or a header that is not text) ends the walk: the
    // client is then the last address a trusted hop vouched for.
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !trusted.contains(ip) {
                return client;
            }
        }
    }
    client
}

/// Once per process: a private or loopback peer that sends `X-Forwarded-For` but is not
/// trusted is almost always a reverse proxy someone forgot to list, and then every client
/// behind it shares one rate-limit budget.
fn hint_missing_trust(peer: IpAddr, headers: &HeaderMap) {
    static HINTED: AtomicBool = AtomicBool::new(false);
    let internal = match peer {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_unique_local() || v6.is_loopback(),
    };
    if internal && headers.contains_key("x-forwarded-for") && !HINTED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            %peer,
            "request with X-Forwarded-For from a peer not in trusted_proxies: if it is your \
             reverse proxy, list it, or every client behind it shares one rate-limit budget"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn with_xff(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_says() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = with_xff(&[b"203.0.113.1, 10.0.0.5"]);
        assert_eq!(client_ip(ip("198.51.100.7"), &h, &t), ip("198.51.100.7"));
        assert_eq!(
            client_ip(ip("198.51.100.7"), &h, &TrustedProxies::default()),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn trusted_chain_yields_the_rightmost_untrusted_address() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.1/32"]);
        let cases: &[(&str, &[&[u8]], &str)] = &[
            // Plain: one proxy in front.
            ("10.0.0.1", &[b"203.0.113.9"], "203.0.113.9"),
            // The client made up the left part; the proxy appended what it saw.
            (
                "10.0.0.1",
                &[b"1.1.1.1, 2.2.2.2, 203.0.113.9"],
                "203.0.113.9",
            ),
            // Two trusted hops.
            ("10.0.0.1", &[b"203.0.113.9, 192.0.2.1"], "203.0.113.9"),
            (
                "10.0.0.1",
                &[b"203.0.113.9,10.9.9.9 , 192.0.2.1"],
                "203.0.113.9",
            ),
            // Several headers are one list, in order.
            (
                "10.0.0.1",
                &[b"1.1.1.1", b"203.0.113.9, 10.1.1.1"],
                "203.0.113.9",
            ),
            // Ports and brackets.
            ("10.0.0.1", &[b"203.0.113.9:4711"], "203.0.113.9"),
            ("10.0.0.1", &[b"[2001:db8::1]:443"], "2001:db8::1"),
            ("10.0.0.1", &[b"[2001:db8::1]"], "2001:db8::1"),
            ("10.0.0.1", &[b"2001:db8::1"], "2001:db8::1"),
            // IPv4-mapped IPv6 is IPv4.
            ("10.0.0.1", &[b"::ffff:203.0.113.9"], "203.0.113.9"),
            ("::ffff:10.0.0.1", &[b"203.0.113.9"], "203.0.113.9"),
            // Garbage stops the walk at the last vouched-for address.
            ("10.0.0.1", &[b"203.0.113.9, unknown"], "10.0.0.1"),
            ("10.0.0.1", &[b"1.1.1.1, nope, 10.2.2.2"], "10.2.2.2"),
            ("10.0.0.1", &[b""], "10.0.0.1"),
            ("10.0.0.1", &[b"203.0.113.9", b"\xff\xfe"], "10.0.0.1"),
            // No header: the proxy itself.
            ("10.0.0.1", &[], "10.0.0.1"),
            // Only trusted hops: the left-most.
            ("10.0.0.1", &[b"10.3.3.3, 10.4.4.4"], "10.3.3.3"),
        ];
        for (peer, xff, want) in cases {
            let got = client_ip(ip(peer), &with_xff(xff), &t);
            assert_eq!(got, ip(want), "peer {peer} xff {xff:?}");
        }
    }
}
