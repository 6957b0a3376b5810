//! Proxy header hygiene, each rule with its reason.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// How the client reached the proxy, fixed per connection by the listener and handed to
/// [`prepare_request`] with each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConn {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The scheme the client spoke; it becomes `X-Forwarded-Proto` (the homeserver builds its
    /// URLs from it).
    pub scheme: ClientScheme,
    /// The peer is in `trusted_proxies`: its `X-Forwarded-*` headers are believed.
    pub trusted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientScheme {
    Http,
    Https,
}

impl ClientScheme {
    fn as_str(self) -> &'static str {
        match self {
            ClientScheme::Http => "http",
            ClientScheme::Https => "https",
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the message, and must
/// not be forwarded. `Proxy-Authorization` carries credentials meant for this hop only.
/// (Typed names: removing by `&str` would parse the name again on every request.)
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    // Most messages have none: one pass over their few names (mostly standard ones, compared
    // as enum tags) instead of nine hashed look-ups (issue 11).
    if !any_of(h, &HOP_BY_HOP) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in &named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Whether `h` has any header named in `names`.
fn any_of(h: &HeaderMap, names: &[HeaderName]) -> bool {
    h.keys().any(|k| names.contains(k))
}

/// Sets `Content-Length` to the length of a body the proxy rebuilt (the old value is stale).
pub fn set_content_length(h: &mut HeaderMap, len: usize) {
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// Client-address headers a homeserver may believe. From a peer not in `trusted_proxies` they are
/// whatever the client made up, so they are dropped (else any client picks the IP the homeserver
/// logs and rate-limits) and `X-Forwarded-For` is rebuilt from the peer alone.
const UNTRUSTED_FORWARDING: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-for"),
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Prepares request headers for the homeserver.
/// - `X-Forwarded-For`: from a trusted peer (a proxy in `trusted_proxies`) the peer is appended to
///   the chain it sent; from any other peer, the client's `X-Forwarded-For`, `Forwarded` and
///   `X-Real-IP` are dropped and `X-Forwarded-For` is the peer alone.
/// - `X-Forwarded-Proto`: the scheme the client used (the homeserver builds URLs from it). From a
///   peer in `trusted_proxies` (a TLS-terminating ingress) its own `http`/`https` value is kept.
/// - `X-Forwarded-Host` keeps the client's `Host`, which is replaced by the upstream's own
///   authority (the client sets it from the upstream URL) so virtual-hosted homeservers route.
pub fn prepare_request(h: &mut HeaderMap, conn: &ClientConn) {
    let peer_trusted = conn.trusted;
    remove_hop_by_hop(h);
    if !peer_trusted && any_of(h, &UNTRUSTED_FORWARDING) {
        for n in &UNTRUSTED_FORWARDING {
            h.remove(n);
        }
    }
    let proto = match h.get(X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
        Some(b"https") if peer_trusted => "https",
        Some(b"http") if peer_trusted => "http",
        _ => conn.scheme.as_str(),
    };
    let mut value = String::with_capacity(64);
    for prior in h.get_all(X_FORWARDED_FOR) {
        if let Ok(p) = prior.to_str() {
            value.push_str(p);
            value.push_str(", ");
        }
    }
    // An IP address's text form, without a temporary String.
    let _ = std::fmt::Write::write_fmt(&mut value, format_args!("{}", conn.peer.ip()));
    h.remove(X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = h.remove(header::HOST) {
        h.insert(X_FORWARDED_HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str, trusted: bool) -> ClientConn {
        ClientConn {
            peer: SocketAddr::new(peer.parse().unwrap(), 4711),
            scheme: ClientScheme::Http,
            trusted,
        }
    }

    #[test]
    fn hop_by_hop_and_forwarding() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::HOST, HeaderValue::from_static("matrix.example.org"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("forwarded", HeaderValue::from_static("for=203.0.113.9"));
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.9"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request(&mut h, &conn("10.0.0.1", false));
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-authorization",
            "host",
            "forwarded",
            "x-real-ip",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "matrix.example.org");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn a_trusted_peer_s_chain_is_extended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        h.insert("forwarded", HeaderValue::from_static("for=203.0.113.9"));
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.9"));
        prepare_request(&mut h, &conn("10.0.0.1", true));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 10.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["forwarded"], "for=203.0.113.9");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
    }

    #[test]
    fn forwarded_proto_from_a_trusted_peer_is_kept() {
        for (sent, trusted, want) in [
            (Some("https"), true, "https"),
            (Some("http"), true, "http"),
            (Some("https"), false, "http"),
            (Some("gopher"), true, "http"),
            (None, true, "http"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(v) = sent {
                h.insert("x-forwarded-proto", HeaderValue::from_static(v));
            }
            prepare_request(&mut h, &conn("10.0.0.1", trusted));
            assert_eq!(h["x-forwarded-proto"], want, "{sent:?} trusted={trusted}");
        }
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in HOP_BY_HOP.iter().chain(&UNTRUSTED_FORWARDING) {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            h.insert(name.clone(), HeaderValue::from_static("1"));
            h.insert("x-custom", HeaderValue::from_static("kept"));
            prepare_request(&mut h, &conn("10.0.0.1", false));
            if *name != X_FORWARDED_FOR {
                assert!(!h.contains_key(name), "{name} kept");
            }
            assert_eq!(h["x-forwarded-for"], "10.0.0.1");
            assert_eq!(h["x-custom"], "kept");
            assert_eq!(h[header::ACCEPT], "*/*");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }
}
