//! The metrics endpoint: a small HTTP/1.1 server over tokio (already the
//! crate's runtime) answering `GET /metrics` (and `HEAD`) with the
//! registry's OpenMetrics text; `/` says where the metrics are, anything
//! else is 404, other methods 405. Each connection gets one answer and is
//! closed. Requests are bounded (8 KiB head, 5 s to send it) and at most
//! 32 connections are served at once, so a stuck client cannot pile up.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{render, Registry};

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNS: usize = 32;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    /// The address it listens on (the port the system chose for `:0`).
    pub addr: SocketAddr,
}

/// Listen on `addr` and serve `registry` from a background thread named
/// `name`. Binding happens before this returns, so a busy port is the
/// caller's error.
pub fn serve(addr: SocketAddr, registry: Registry, name: &str) -> io::Result<MetricsServer> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("metrics endpoint {local}: {e}");
                        return;
                    }
                };
                let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        drop(sock);
                        continue;
                    };
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let _ = answer(sock, &registry).await;
                    });
                }
            });
        })?;
    Ok(MetricsServer { addr: local })
}

/// Read one request head and write its answer.
async fn answer(mut sock: tokio::net::TcpStream, registry: &Registry) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
            if head.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
    let (status, ctype, body) = match read {
        Err(_) | Ok(Err(_)) => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Ok(Ok(())) => route(&head, registry),
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await
}

/// The answer to the request line of `head`: (status, content type, body).
fn route(head: &[u8], registry: &Registry) -> (&'static str, &'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        );
    }
    match path {
        "/metrics" => match render(registry) {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(_) => (
                "500 Internal Server Error",
                "text/plain",
                "encoding failed\n".to_string(),
            ),
        },
        "/" => (
            "200 OK",
            "text/plain",
            "vdrep metrics: GET /metrics\n".to_string(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let mut r = Registry::default();
        super::super::register(&mut r, |enc| {
            super::super::gauge(
                enc,
                "vdrep_http_test",
                "t",
                None,
                [(super::super::Labels::new(), 3u64)],
            )
        });
        let srv = serve("127.0.0.1:0".parse().unwrap(), r, "metrics-test").unwrap();
        let ok = get(srv.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("vdrep_http_test 3\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        let nf = get(srv.addr, "GET /nope HTTP/1.1\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = get(srv.addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let head = get(srv.addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200") && !head.contains("# EOF"),
            "{head}"
        );
        // A port in use is the caller's error.
        assert!(serve(srv.addr, Registry::default(), "metrics-test2").is_err());
    }
}
