//! One small HTTP/1.1 client over a plain `TcpStream` to 127.0.0.1, for tests that
//! must see exactly what goes on the wire (headers, tokens, status codes).

use std::time::Duration;

/// Whether `GET /readyz` on `port` answers 200.
pub fn readyz(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// An answer of [`request`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The header block, lower-cased.
    pub headers: String,
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
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
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Response {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(&request_bytes(method, path, token, body))
        .unwrap();

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some(end) = text.find("\r\n\r\n") {
            let headers = text[..end].to_ascii_lowercase();
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
                    .unwrap_or_else(|| panic!("{method} {path}: no status in {headers:?}"));
                return Response {
                    status,
                    body: text[end + 4..].to_string(),
                    headers,
                };
            }
        }
        assert!(n > 0, "{method} {path}: the connection closed mid-head");
    }
}
