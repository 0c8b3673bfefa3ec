//! The one HTTP/1.1 client of the tests: a plain `TcpStream` to 127.0.0.1, for tests
//! that must see exactly what goes on the wire (headers, tokens, status codes), and
//! for the harness's readiness probes (`/readyz`, etcd's `/health`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long [`request`] waits to connect, and then for each read of the answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `GET /readyz` on `port` answers 200.
pub fn readyz(port: u16) -> bool {
    try_request(port, "GET", "/readyz", None, None, Duration::from_secs(2))
        .is_ok_and(|r| r.status == 200)
}

/// An answer of [`request`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The header block, lower-cased.
    pub headers: String,
    pub body: String,
    /// The header block as sent, for [`Response::header`].
    head: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of the header `name` (in any case), as sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// The bytes of one HTTP/1.1 request on its own connection (`Connection:
/// close`), with exactly the bearer token given and a JSON body.
pub fn request_bytes(
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    format!("{head}\r\n{body}").into_bytes()
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`, with exactly the
/// `Authorization: Bearer` header given (none for `None`) and a JSON body.
/// A streaming answer (Server-Sent Events) is returned once its head is in.
/// Panics when there is no answer; see [`try_request`].
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Response {
    try_request(port, method, path, token, body, TIMEOUT)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`request`] that returns the error instead of panicking (nothing listens yet,
/// or any more), waiting `timeout` to connect and then for each read.
pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&request_bytes(method, path, token, body))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let headers = head.to_ascii_lowercase();
            let length = headers
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(length) => raw.len() >= end + 4 + length,
                None => headers.contains("text/event-stream"),
            };
            if done || n == 0 {
                let status = headers
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("no status in {headers:?}")))?;
                let mut body = raw[end + 4..].to_vec();
                // The whole of a chunked answer is in once the server closed.
                if n == 0 && headers.contains("transfer-encoding: chunked") {
                    body = dechunk(&body).ok_or_else(|| {
                        io::Error::other(format!(
                            "bad chunked body {:?}",
                            String::from_utf8_lossy(&body)
                        ))
                    })?;
                }
                return Ok(Response {
                    status,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    head,
                });
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed mid-head",
            ));
        }
    }
}

/// The payload of a whole `Transfer-Encoding: chunked` body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).ok()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(end + 2..end + 2 + size)?);
        raw = raw.get(end + 4 + size..)?;
    }
}
