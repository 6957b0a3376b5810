//! Proxy header hygiene, each rule with its reason.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// How the client reached the proxy, fixed per connection by the listener and handed to
/// [`prepare_request`] with each request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConn {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The scheme the client spoke; it becomes `X-Forwarded-Proto` (the homeserver builds its
    /// URLs from it).
    pub scheme: ClientScheme,
    /// The peer is in `trusted_proxies`: its `X-Forwarded-*` headers are believed.
    pub trusted: bool,
    /// The peer's address as header text, rendered once per connection (formatting it cost
    /// about 1,000 instructions per request, issue 11).
    peer_text: HeaderValue,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, scheme: ClientScheme, trusted: bool) -> Self {
        let peer_text = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address's text is a header value");
        ClientConn {
            peer,
            scheme,
            trusted,
            peer_text,
        }
    }
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

const HOPS: usize = 9;
/// Where `Connection` stands in [`HOP_BY_HOP`].
const CONNECTION_AT: usize = 0;

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the message, and must
/// not be forwarded. `Proxy-Authorization` carries credentials meant for this hop only.
/// (Typed names: removing by `&str` would parse the name again on every request.)
static HOP_BY_HOP: [HeaderName; HOPS] = [
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
    // One pass over the message's few names (mostly standard ones, compared as enum tags) finds
    // which are there: usually none on a request, only `Connection: keep-alive` on an upstream
    // answer. Only those are removed (each removal hashes its name; nine removals and the
    // parsed `Connection` list cost 2,700 instructions per request, issue 11).
    let mut present = [false; HOPS];
    for k in h.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    if present[CONNECTION_AT] {
        // Fields the `Connection` header names (RFC 9110 §7.6.1), other than those removed
        // anyway: found among the message's own names, not parsed and looked up.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|n| n.as_str().eq_ignore_ascii_case(t))
            })
            .flat_map(|t| h.keys().filter(move |k| k.as_str().eq_ignore_ascii_case(t)))
            .cloned()
            .collect();
        for n in &named {
            h.remove(n);
        }
    }
    for (n, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(n);
    }
}

/// The position of `name` in [`HOP_BY_HOP`]: a match on the text (a switch on its length, then
/// one comparison), not nine `HeaderName` comparisons.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => CONNECTION_AT,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], *name);
    Some(i)
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
static UNTRUSTED_FORWARDING: [HeaderName; 3] = [
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
    // `insert` replaces every earlier value: one `X-Forwarded-For`, one `X-Forwarded-Proto`.
    // Only a trusted peer's chain is still here.
    let forwarded_for = if h.contains_key(X_FORWARDED_FOR) {
        let mut value = String::with_capacity(64);
        for prior in h.get_all(X_FORWARDED_FOR) {
            if let Ok(p) = prior.to_str() {
                value.push_str(p);
                value.push_str(", ");
            }
        }
        value.push_str(conn.peer_text.to_str().unwrap_or_default());
        HeaderValue::try_from(value).unwrap_or_else(|_| conn.peer_text.clone())
    } else {
        conn.peer_text.clone()
    };
    h.insert(X_FORWARDED_FOR, forwarded_for);
    let proto = match h.entry(X_FORWARDED_PROTO) {
        header::Entry::Occupied(e) => match e.get().as_bytes() {
            b"https" if peer_trusted => "https",
            b"http" if peer_trusted => "http",
            _ => conn.scheme.as_str(),
        },
        header::Entry::Vacant(_) => conn.scheme.as_str(),
    };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = h.remove(header::HOST) {
        h.insert(X_FORWARDED_HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str, trusted: bool) -> ClientConn {
        ClientConn::new(
            SocketAddr::new(peer.parse().unwrap(), 4711),
            ClientScheme::Http,
            trusted,
        )
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
    fn the_index_match_agrees_with_the_list() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        for n in [header::HOST, header::CONTENT_TYPE, header::AUTHORIZATION] {
            assert_eq!(hop_by_hop_index(&n), None);
        }
    }

    #[test]
    fn connection_named_fields_are_removed_in_any_case() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Hop-One"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-hop-two ,close"),
        );
        h.insert("x-hop-one", HeaderValue::from_static("1"));
        h.insert("x-hop-two", HeaderValue::from_static("2"));
        h.insert("close", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
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
