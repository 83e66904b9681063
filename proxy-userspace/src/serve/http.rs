//! The HTTP server of the agent's health and metrics endpoints, on hyper (HTTP/1.1, GET and
//! HEAD only, bounded request head and read time): kubelet probes, load-balancer health
//! checks and Prometheus scrapes. A handler sees the path and the headers that negotiate the
//! response ([`Request`]); a compressible response is gzipped when the client asks for it.
use std::{convert::Infallible, io::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Method, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::debug;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Longest request head accepted (hyper's read buffer; its minimum is 8192).
const MAX_HEAD: usize = 8192;
/// Time a client gets to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bodies shorter than this are sent as they are even when gzip is accepted.
const GZIP_MIN: usize = 512;

/// What a handler sees of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The path, query string stripped.
    pub path: String,
    /// The `Accept` header, if any.
    pub accept: Option<String>,
}

impl Request {
    pub fn path(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            accept: None,
        }
    }
}

/// A response: status code, content type, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Gzipped when the client accepts it (`/metrics`; probes get plain bodies).
    pub compressible: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            compressible: false,
        }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "application/json", body)
    }
    /// Allows gzip for this response.
    pub fn compressible(mut self) -> Self {
        self.compressible = true;
        self
    }
}

/// Handles one request.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// The media ranges of an `Accept` or `Accept-Encoding` header with their quality
/// (RFC 9110 12.4.2: `q` defaults to 1; a malformed `q` counts as 0). Pure.
pub fn qualities(header: &str) -> Vec<(String, f32)> {
    header
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?.to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            Some((name, q))
        })
        .collect()
}

/// Whether an `Accept-Encoding` header accepts gzip (named, or `*`, with q > 0). Pure.
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    let Some(h) = accept_encoding else {
        return false;
    };
    let q = qualities(h);
    let of = |n: &str| q.iter().find(|(name, _)| name == n).map(|(_, q)| *q);
    match (of("gzip"), of("x-gzip"), of("*")) {
        (Some(g), _, _) => g > 0.0,
        (None, Some(g), _) => g > 0.0,
        (None, None, Some(any)) => any > 0.0,
        _ => false,
    }
}

/// gzip at the default level.
pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body)?;
    e.finish()
}

/// Binds `addr`; fails with a message naming the flag to change.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} endpoint on {addr}"))
}

/// Serves `handler` on `listener` until the task is dropped/aborted.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let h = handler.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let h = h.clone();
                        async move { Ok::<_, Infallible>(respond(&req, &h)) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        debug!("http request from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                debug!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One request -> one response (hyper leaves the body out for HEAD).
fn respond(req: &hyper::Request<Incoming>, handler: &Handler) -> hyper::Response<Full<Bytes>> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let resp = if req.method() != Method::GET && req.method() != Method::HEAD {
        Response::text(405, "only GET and HEAD\n")
    } else {
        handler(&Request {
            path: req.uri().path().to_owned(),
            accept: header(header::ACCEPT).map(str::to_owned),
        })
    };
    let mut body = resp.body.into_bytes();
    let mut encoded = false;
    if resp.compressible && body.len() >= GZIP_MIN && accepts_gzip(header(header::ACCEPT_ENCODING))
    {
        match gzip(&body) {
            Ok(z) => {
                body = z;
                encoded = true;
            }
            Err(e) => debug!("gzip: {e}"),
        }
    }
    let mut b = hyper::Response::builder()
        .status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, resp.content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if resp.compressible {
        b = b.header(header::VARY, "Accept, Accept-Encoding");
    }
    if encoded {
        b = b.header(header::CONTENT_ENCODING, "gzip");
    }
    b.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

/// A minimal client for tests and probes: GET `path` from `addr` with extra header lines,
/// returns (status, head, body bytes).
pub async fn get_raw(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP head in {:?}", String::from_utf8_lossy(&out)))?;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, head, out[split + 4..].to_vec()))
}

/// GET `path` from `addr`, returns (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = get_raw(addr, path, &[]).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{io::Read as _, net::Ipv4Addr};

    use super::*;

    #[test]
    fn accept_encoding() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("deflate, gzip;q=0.5")));
        assert!(accepts_gzip(Some("*")));
        assert!(accepts_gzip(Some("x-gzip")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("gzip;q=0, *")), "named wins over *");
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(Some("")));
        assert!(!accepts_gzip(None));
        assert_eq!(
            qualities("text/plain;version=0.0.4;q=0.3, */*;q=bad"),
            [("text/plain".to_owned(), 0.3), ("*/*".to_owned(), 0.0)]
        );
    }

    #[tokio::test]
    async fn gzip_only_when_asked_and_only_for_compressible_bodies() {
        let big = "x".repeat(4096);
        let b2 = big.clone();
        let h: Handler = Arc::new(move |r| match r.path.as_str() {
            "/big" => Response::text(200, b2.clone()).compressible(),
            "/probe" => Response::text(200, b2.clone()),
            "/accept" => Response::text(200, r.accept.clone().unwrap_or_default()),
            _ => Response::text(404, "no\n"),
        });
        let l = bind((Ipv4Addr::LOCALHOST, 0).into(), "test").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(serve(l, h));
        let gz = [("Accept-Encoding", "gzip")];
        let (code, head, body) = get_raw(addr, "/big?x=1", &gz).await.unwrap();
        assert_eq!(code, 200);
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-encoding: gzip"), "{head}");
        assert!(head.contains("vary: accept, accept-encoding"), "{head}");
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, big);
        assert!(body.len() < 200, "{} bytes gzipped", body.len());
        let (_, head, body) = get_raw(addr, "/big", &[]).await.unwrap();
        assert!(!head.to_ascii_lowercase().contains("content-encoding"));
        assert_eq!(body.len(), 4096);
        let (_, head, body) = get_raw(addr, "/probe", &gz).await.unwrap();
        assert!(!head.to_ascii_lowercase().contains("content-encoding"));
        assert_eq!(body.len(), 4096);
        let (_, _, body) = get_raw(addr, "/accept", &[("Accept", "text/plain")])
            .await
            .unwrap();
        assert_eq!(body, b"text/plain");
        assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
        // Not GET/HEAD.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        // HEAD: the head with the length, no body.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"HEAD /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "no body after HEAD: {out}");
        // Garbage instead of a request.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x16\x03\x01 not http\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
        task.abort();
    }
}
