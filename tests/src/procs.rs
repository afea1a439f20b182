//! Real NATS and Redis servers as child processes.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const HINT: &str = "run the tests through ./scripts/test.sh, which installs it";

/// Returns the binary and arguments that start a server in `dir` on `port`.
type Launch = fn(dir: &Path, port: u16) -> (&'static str, Vec<String>);

/// A server child process on a fixed port with its own data folder; it can be
/// killed and started again on the same port and data, and dies with the test.
#[derive(Debug)]
struct ChildServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    launch: Launch,
}

impl ChildServer {
    fn start(launch: Launch) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut server = Self {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            port,
            launch,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let (binary, args) = (self.launch)(self.dir.path(), self.port);
        let child = Command::new(binary)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{binary}` ({e}); {HINT}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{binary} did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nats(dir: &Path, port: u16) -> (&'static str, Vec<String>) {
    nats_syncing(dir, port, "  sync_interval: always\n")
}

fn nats_default_sync(dir: &Path, port: u16) -> (&'static str, Vec<String>) {
    nats_syncing(dir, port, "")
}

fn nats_syncing(dir: &Path, port: u16, sync_line: &str) -> (&'static str, Vec<String>) {
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n{sync_line}}}\n",
            dir.join("js").display()
        ),
    )
    .expect("write nats.conf");
    ("nats-server", vec!["-c".into(), conf.display().to_string()])
}

fn redis(dir: &Path, port: u16) -> (&'static str, Vec<String>) {
    let args = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--dir",
        &dir.display().to_string(),
        "--appendonly",
        "yes",
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ("redis-server", args)
}

/// A JetStream-enabled nats-server with file storage and `sync_interval: always`
/// (unless started otherwise).
#[derive(Debug)]
pub struct NatsServer(ChildServer);

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self(ChildServer::start(nats))
    }

    /// Starts a server on a free port with NATS's default sync (every two
    /// minutes) instead.
    pub fn start_default_sync() -> Self {
        Self(ChildServer::start(nats_default_sync))
    }

    /// Returns the client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }

    /// Kills the server (SIGKILL); its store stays for a restart.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.0.restart();
    }
}

/// A redis-server with append-only persistence and no eviction.
#[derive(Debug)]
pub struct RedisServer(ChildServer);

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self(ChildServer::start(redis))
    }

    /// Returns the client URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port)
    }

    /// Opens a connection, for a test that reads or changes claims itself.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// Stops the server (SIGKILL); the append-only file stays for a restart.
    pub fn stop(&mut self) {
        self.0.kill();
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.0.restart();
    }
}
