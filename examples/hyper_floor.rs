//! The floor of a reverse proxy on hyper, for `scripts/bench.sh` (issue 11): an HTTP/1 server
//! whose every request is forwarded on a keep-alive upstream connection of its own client
//! connection (hyper's `client::conn::http1`), with no routing, logging, metrics, limits or
//! session work. It is not the proxy: it tells how much of the proxy's cost per request is
//! hyper and tokio themselves, and so what any proxy built on them can reach here.
//!
//!     cargo run --release --example hyper_floor -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

async fn connect(upstream: &str) -> std::io::Result<SendRequest<Incoming>> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream) = (args[1].clone(), Arc::new(args[2].clone()));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(send) = connect(&upstream).await else {
                        return;
                    };
                    let send = Arc::new(Mutex::new(send));
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let send = send.clone();
                        async move {
                            let mut send = send.lock().await;
                            send.ready().await?;
                            let res: Response<Incoming> = send.send_request(req).await?;
                            Ok::<_, hyper::Error>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .writev(false)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
}
