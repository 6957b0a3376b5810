//! A minimal stand-in homeserver for `scripts/bench.sh`: answers `/login` with a fresh token and
//! every other request with a small JSON body, as fast as hyper allows, so a benchmark measures
//! the proxy rather than a homeserver.
//!
//!     cargo run --release --example bench_upstream -- 127.0.0.1:18008

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

static NEXT: AtomicU64 = AtomicU64::new(0);

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let login = req.uri().path().ends_with("/login");
    // Drain the body (uploads) without keeping it.
    let _ = req.into_body().collect().await;
    let body = if login {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!(
            r#"{{"user_id":"@bench{n}:bench","device_id":"DEV{n}","access_token":"syt_bench_{n}"}}"#
        )
    } else {
        r#"{"user_id":"@bench:bench","device_id":"DEV"}"#.to_owned()
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    Ok(r)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18008".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench upstream on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
