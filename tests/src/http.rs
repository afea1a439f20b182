//! A minimal HTTP/1.1 receiver for webhook tests: it records every request
//! and answers as the test's function says, optionally after a delay, while
//! counting how many requests it holds at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

/// How to answer: status line (e.g. `200 OK`), body, and how long to wait first.
pub type Answer = (&'static str, &'static str, Duration);

/// Decides the answer from the path and how many earlier requests had it.
pub type Respond = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    /// Base URL, `http://127.0.0.1:port`.
    pub url: String,
    seen: Arc<Mutex<Vec<Received>>>,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("url", &self.url).finish()
    }
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub async fn start(respond: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let receiver = Self {
            url: format!("http://{}", listener.local_addr().expect("addr")),
            seen: Arc::default(),
            now: Arc::default(),
            peak: Arc::default(),
        };
        let respond: Respond = Arc::new(respond);
        let shared = receiver.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(shared.clone().serve(socket, respond.clone()));
            }
        });
        receiver
    }

    /// Returns every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.seen.lock().expect("requests").clone()
    }

    /// Returns the most requests held at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    async fn serve(self, mut socket: tokio::net::TcpStream, respond: Respond) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("/")
            .to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = socket.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..].to_vec();
        let earlier = {
            let mut seen = self.seen.lock().expect("requests");
            let earlier = seen.iter().filter(|r| r.path == path).count();
            seen.push(Received {
                path: path.clone(),
                headers,
                body,
            });
            earlier
        };
        let (status, text, delay) = respond(&path, earlier);
        let holding = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(holding, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = socket.write_all(response.as_bytes()).await;
    }
}
