//! A small HTTP/1.1 file server on 127.0.0.1 with the faults the fill engine
//! must survive or report: 404, truncated bodies (once or always), no Range
//! support, and a slow mode for crash tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serve correctly, with Range support.
    #[default]
    None,
    /// Cut the first full-body response at half its length; Range works.
    TruncateOnce,
    /// Cut every response at half its length and refuse Range.
    TruncateAlways,
    /// Send the body in 64 KiB pieces with a pause between them.
    Slow,
}

/// A running server; stops when dropped (its thread ends with the process).
pub struct Server {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Requests served, for assertions.
    pub requests: Arc<AtomicU32>,
}

impl Server {
    /// Starts serving on a random port.
    pub fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let requests = Arc::new(AtomicU32::new(0));
        let (f, r) = (files.clone(), requests.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (f, r) = (f.clone(), r.clone());
                thread::spawn(move || {
                    let _ = handle(stream, &f, &r, fault);
                });
            }
        });
        Self { base, files, requests }
    }

    /// Serves `body` at `/<name>` and returns its URL.
    pub fn put(&self, name: &str, body: Vec<u8>) -> String {
        self.files.lock().expect("lock").insert(format!("/{name}"), body);
        format!("{}/{name}", self.base)
    }
}

fn handle(
    stream: TcpStream,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    requests: &AtomicU32,
    fault: Fault,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut range: Option<u64> = None;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = v
                        .trim()
                        .strip_prefix("bytes=")
                        .and_then(|r| r.trim_end_matches('-').parse().ok());
                }
            }
        }
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let body = files
            .lock()
            .map_err(|_| std::io::Error::other("lock"))?
            .get(&path)
            .cloned();
        let Some(body) = body else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")?;
            continue;
        };
        let ranges = fault != Fault::TruncateAlways;
        let accept = if ranges { "accept-ranges: bytes\r\n" } else { "" };
        if method == "HEAD" {
            write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{accept}\r\n", body.len())?;
            continue;
        }
        let (status, start) = match range {
            Some(start) if ranges => ("206 Partial Content", start.min(body.len() as u64) as usize),
            _ => ("200 OK", 0),
        };
        let total = body.len();
        let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n{accept}", total - start);
        if start > 0 || status.starts_with("206") {
            head.push_str(&format!(
                "content-range: bytes {start}-{}/{total}\r\n",
                total.saturating_sub(1)
            ));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        let cut = match fault {
            Fault::TruncateAlways => true,
            Fault::TruncateOnce => start == 0 && n <= 2,
            _ => false,
        };
        if cut {
            out.write_all(&body[start..start + (total - start) / 2])?;
            out.flush()?;
            return Ok(()); // close mid-body
        }
        if fault == Fault::Slow {
            for chunk in body[start..].chunks(64 << 10) {
                out.write_all(chunk)?;
                thread::sleep(Duration::from_millis(20));
            }
        } else {
            out.write_all(&body[start..])?;
        }
    }
}
