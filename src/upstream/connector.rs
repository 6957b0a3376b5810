//! The upstream connector: TCP, then TLS for `https://` upstreams (hyper-rustls), the whole of
//! it bounded by `upstream.connect_timeout`. hyper-util's own connect timeout covers the TCP
//! connect only; a homeserver (or a middlebox) that accepts but never finishes the TLS handshake
//! would otherwise hold the request until `response_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::body::BoxError;
use crate::config::UpstreamConfig;
use crate::tls::TlsError;

/// The connector of the pooled upstream client.
pub type UpstreamConnector = ConnectDeadline<HttpsConnector<HttpConnector>>;

/// Builds the connector: plain TCP for `http://`, rustls (system roots or `upstream.ca_file`,
/// ALPN `http/1.1`) for `https://`.
pub fn connector(cfg: &UpstreamConfig) -> Result<UpstreamConnector, TlsError> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(cfg.connect_timeout));
    tcp.set_nodelay(true);
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    // The scheme is checked by the TLS layer: https:// URIs reach it.
    tcp.enforce_http(false);
    let https = cfg.url.scheme_str() == Some("https");
    let tls = crate::tls::upstream_client_config(https, cfg.ca_file.as_deref())?;
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(ConnectDeadline {
        inner: connector,
        timeout: cfg.connect_timeout,
    })
}

/// A connector whose every connection attempt (TCP and TLS) ends within `timeout`, with an
/// `io::ErrorKind::TimedOut` error (the client answers 504 for it).
#[derive(Clone)]
pub struct ConnectDeadline<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<Uri> for ConnectDeadline<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting to the homeserver (TCP and TLS) timed out",
                )) as BoxError),
            }
        })
    }
}
