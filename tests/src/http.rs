//! A small HTTP/1.1 file server on 127.0.0.1 with the faults the fill engine
//! must survive or report: 404, truncated bodies (once or always), no Range
//! support, HEAD refused (as presigned GET URLs do), redirects, and a slow
//! mode for crash tests. Bodies carry a strong ETag and honour `If-Range`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// Answer 403 to HEAD, like S3 and GCS presigned GET URLs.
    NoHead,
    /// Answer `503 Service Unavailable` to the first n requests.
    Unavailable(u32),
    /// Answer `503 Service Unavailable` to every other pair of requests (a
    /// fill's HEAD and GET), so half the attempts fail.
    EveryOther,
    /// Send the body 1 KiB at a time, 100 ms apart: a stalled source.
    Drip,
}

#[derive(Debug, Clone)]
enum Entry {
    Body(Vec<u8>),
    Redirect(String),
}

/// A running server; stops when dropped (its thread ends with the process).
pub struct Server {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    files: Arc<Mutex<HashMap<String, Entry>>>,
    /// Requests served, for assertions.
    pub requests: Arc<AtomicU32>,
    /// The start offset of every Range request, for assertions on resumes.
    pub range_starts: Arc<Mutex<Vec<u64>>>,
    /// Body bytes sent in full responses (what an origin paid).
    pub bytes_served: Arc<AtomicU64>,
    /// Bodies that replace a file once a response for it was cut.
    after_cut: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl Server {
    /// Starts serving on a random port.
    pub fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let files: Arc<Mutex<HashMap<String, Entry>>> = Arc::default();
        let requests = Arc::new(AtomicU32::new(0));
        let range_starts: Arc<Mutex<Vec<u64>>> = Arc::default();
        let after_cut: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let bytes_served = Arc::new(AtomicU64::new(0));
        let state = State {
            bytes_served: bytes_served.clone(),
            files: files.clone(),
            requests: requests.clone(),
            range_starts: range_starts.clone(),
            after_cut: after_cut.clone(),
            fault,
        };
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                thread::spawn(move || {
                    let _ = handle(stream, &state);
                });
            }
        });
        Self {
            base,
            files,
            requests,
            range_starts,
            bytes_served,
            after_cut,
        }
    }

    /// Once a response for `/<name>` is cut, serve `body` there instead (a
    /// new version of the object, with a new ETag).
    pub fn replace_after_cut(&self, name: &str, body: Vec<u8>) {
        self.after_cut.lock().expect("lock").insert(format!("/{name}"), body);
    }

    /// Serves `body` at `/<name>` and returns its URL. Putting a new body
    /// under the same name changes its ETag, as a new object version would.
    pub fn put(&self, name: &str, body: Vec<u8>) -> String {
        self.files
            .lock()
            .expect("lock")
            .insert(format!("/{name}"), Entry::Body(body));
        format!("{}/{name}", self.base)
    }

    /// Answers `/<name>` with `302 Found` to `location`, and returns the URL.
    pub fn redirect(&self, name: &str, location: &str) -> String {
        self.files
            .lock()
            .expect("lock")
            .insert(format!("/{name}"), Entry::Redirect(location.to_string()));
        format!("{}/{name}", self.base)
    }
}

/// A strong ETag that changes with the content.
fn etag(body: &[u8]) -> String {
    format!("\"{}\"", &crate::sha256_hex(body)[..16])
}

#[derive(Clone)]
struct State {
    bytes_served: Arc<AtomicU64>,
    files: Arc<Mutex<HashMap<String, Entry>>>,
    requests: Arc<AtomicU32>,
    range_starts: Arc<Mutex<Vec<u64>>>,
    after_cut: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    fault: Fault,
}

fn handle(stream: TcpStream, state: &State) -> std::io::Result<()> {
    let State {
        bytes_served,
        files,
        requests,
        range_starts,
        after_cut,
        fault,
    } = state;
    let fault = *fault;
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
        let mut range_end: Option<u64> = None;
        let mut if_range: Option<String> = None;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    let spec = v.trim().strip_prefix("bytes=").unwrap_or_default();
                    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
                    range = a.parse().ok();
                    range_end = b.parse().ok();
                }
                if k.eq_ignore_ascii_case("if-range") {
                    if_range = Some(v.trim().to_string());
                }
            }
        }
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let unavailable = match fault {
            Fault::Unavailable(first) => n < first,
            Fault::EveryOther => (n / 2) % 2 == 1,
            _ => false,
        };
        if unavailable {
            out.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        }
        let body = files
            .lock()
            .map_err(|_| std::io::Error::other("lock"))?
            .get(&path)
            .cloned();
        let body = match body {
            None => {
                out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")?;
                continue;
            }
            Some(Entry::Redirect(location)) => {
                write!(
                    out,
                    "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
                )?;
                continue;
            }
            Some(Entry::Body(body)) => body,
        };
        let ranges = fault != Fault::TruncateAlways;
        let accept = if ranges { "accept-ranges: bytes\r\n" } else { "" };
        let tag = etag(&body);
        if method == "HEAD" {
            if fault == Fault::NoHead {
                out.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")?;
            } else {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\netag: {tag}\r\n{accept}\r\n",
                    body.len()
                )?;
            }
            continue;
        }
        if let Some(start) = range {
            range_starts
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?
                .push(start);
        }
        // RFC 9110 If-Range: a validator that no longer matches gets the whole new body.
        let range = range.filter(|_| if_range.as_ref().is_none_or(|v| *v == tag));
        let ranged = range.is_some() && ranges;
        let (status, start) = match range {
            Some(start) if ranges => ("206 Partial Content", start.min(body.len() as u64) as usize),
            _ => ("200 OK", 0),
        };
        let total = body.len();
        // `bytes=a-b` serves through b (inclusive); `bytes=a-` to the end.
        let end = match range_end {
            Some(last) if ranged => (last as usize + 1).min(total).max(start),
            _ => total,
        };
        let body = body[..end].to_vec();
        let mut head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\netag: {tag}\r\n{accept}",
            end - start
        );
        if start > 0 || status.starts_with("206") {
            head.push_str(&format!(
                "content-range: bytes {start}-{}/{total}\r\n",
                end.saturating_sub(1)
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
            let replacement = after_cut
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?
                .remove(&path);
            if let Some(new) = replacement {
                files
                    .lock()
                    .map_err(|_| std::io::Error::other("lock"))?
                    .insert(path.clone(), Entry::Body(new));
            }
            out.write_all(&body[start..start + (end - start) / 2])?;
            out.flush()?;
            return Ok(()); // close mid-body
        }
        bytes_served.fetch_add((end - start) as u64, Ordering::SeqCst);
        if fault == Fault::Slow {
            for chunk in body[start..].chunks(64 << 10) {
                out.write_all(chunk)?;
                thread::sleep(Duration::from_millis(20));
            }
        } else if fault == Fault::Drip {
            for chunk in body[start..].chunks(1 << 10) {
                out.write_all(chunk)?;
                out.flush()?;
                thread::sleep(Duration::from_millis(100));
            }
        } else {
            out.write_all(&body[start..])?;
        }
    }
}
