//! A tiny HTTP/1.1 server for the agent's health and metrics endpoints: GET/HEAD only, one
//! request per connection (`Connection: close`), bounded request size and read time. That is
//! all kubelet probes, load-balancer health checks and Prometheus scrapes need, without an
//! HTTP framework in the agent.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use log::debug;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Longest request head accepted.
const MAX_HEAD: usize = 8192;
/// Time a client gets to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status code, content type, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "application/json", body)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Handles one request: the path (query string stripped) -> response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

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
                    if let Err(e) = handle(stream, h).await {
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

async fn handle(mut stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buf.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(head, Ok(Ok(true)));
    let text = String::from_utf8_lossy(&buf);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let resp = if !complete || target.is_empty() {
        Response::text(400, "bad request\n")
    } else if method != "GET" && method != "HEAD" {
        Response::text(405, "only GET and HEAD\n")
    } else {
        let path = target.split(['?', '#']).next().unwrap_or("/");
        handler(path)
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(resp.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// A minimal client for tests and probes: GET `path` from `addr`, returns (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
