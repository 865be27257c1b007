//! A raw HTTP/1.1 client for tests that must send what a real SDK would
//! not (wrong Host, no token, garbage, headers it never finishes): one
//! request per connection, or several on one kept open.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` to `addr` with `headers` (Host included only if
/// given), reads the whole answer. Call from a thread inside the right netns.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let close = [("Connection", "close")];
    stream.write_all(request_text(method, path, close.iter().chain(headers)).as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("read reply")?;
    parse(&String::from_utf8_lossy(&raw))
}

/// One connection kept open for request after request, as the SDKs use
/// it. Call from a thread inside the right netns.
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Result<KeepAlive> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(KeepAlive { stream })
    }

    /// `GET path` on this connection; reads exactly its answer (by
    /// `Content-Length`), leaving the connection open.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        self.stream
            .write_all(request_text("GET", path, headers).as_bytes())?;
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut byte).context("read reply head")? {
                0 => bail!("closed before the reply's head ended: {raw:?}"),
                _ => raw.push(byte[0]),
            }
        }
        let head = parse(&String::from_utf8_lossy(&raw))?;
        let length: usize = head
            .header("content-length")
            .context("no Content-Length")?
            .parse()?;
        let mut body = vec![0u8; length];
        self.stream
            .read_exact(&mut body)
            .context("read reply body")?;
        Ok(Reply {
            body: String::from_utf8_lossy(&body).into_owned(),
            ..head
        })
    }

    /// Sends `bytes` as they are (a request's beginning, never its end).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.stream.write_all(bytes)?)
    }

    /// Whether the agent closed the connection (end of stream or reset)
    /// before the read timeout.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 512];
        match self.stream.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// `method path` with `headers`, as sent.
fn request_text<'a>(
    method: &str,
    path: &str,
    headers: impl IntoIterator<Item = &'a (&'a str, &'a str)>,
) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req
}

fn parse(raw: &str) -> Result<Reply> {
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("no header end in {raw:?}");
    };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// `Host` header value for an address (`[v6]` bracketed).
pub fn host_header(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    }
}
