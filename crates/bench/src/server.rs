//! kairos-server as a child process, so its CPU and memory are its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

/// A running kairos-server.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    /// gRPC URL.
    pub(crate) url: String,
}

/// Settings for one server run.
#[derive(Debug, Clone)]
pub(crate) struct ServerSettings {
    /// Path of the kairos-server binary.
    pub(crate) binary: PathBuf,
    /// NATS URL.
    pub(crate) nats_url: String,
    /// Redis URL.
    pub(crate) redis_url: String,
    /// Database URL.
    pub(crate) database_url: String,
    /// Environment beyond the URLs: the log filter (KAIROS_LOG), and extra
    /// settings (e.g. KAIROS_LOOKAHEAD).
    pub(crate) env: Vec<(String, String)>,
    /// File the server logs to.
    pub(crate) log: PathBuf,
}

impl ServerProcess {
    /// Starts the server on a free port and waits until it accepts connections.
    pub(crate) async fn start(settings: &ServerSettings) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if let Some(dir) = settings.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Appended to: a restarted server (the durable scenario) keeps one log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.log)
            .with_context(|| format!("server log {}", settings.log.display()))?;
        let mut command = Command::new(&settings.binary);
        command
            .env("KAIROS_LISTEN", format!("127.0.0.1:{port}"))
            .env("KAIROS_NATS_URL", &settings.nats_url)
            .env("KAIROS_REDIS_URL", &settings.redis_url)
            .env("KAIROS_DATABASE_URL", &settings.database_url)
            // The server logs to stdout: its warnings (a lost lease, a
            // bucket reopened) explain a run that went wrong.
            .stdout(log)
            .stderr(Stdio::inherit());
        for (k, v) in &settings.env {
            command.env(k, v);
        }
        let child = command.spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self { child, url });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("kairos-server did not start")
    }

    /// Returns (CPU seconds used so far, current RSS in MB, peak RSS in MB).
    pub(crate) fn usage(&self) -> (f64, f64, f64) {
        proc_usage(self.child.id())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Reads CPU seconds and RSS of a process from /proc.
pub(crate) fn proc_usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after ')'.
    let cpu_s = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (cpu_s, kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// CPU seconds of a process and of its children alive now (Postgres: the
/// postmaster and one backend per connection, which live as long as the pool).
pub(crate) fn tree_cpu(root: u32) -> f64 {
    let mut total = proc_usage(root).0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The parent pid is the second field after the command name.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if parent == Some(root) {
            total += proc_usage(pid).0;
        }
    }
    total
}

/// Creates an empty database `name` on the Postgres server at `base_url`, after
/// dropping those of earlier runs, and returns its URL.
pub(crate) async fn fresh_postgres_database(base_url: &str, name: &str) -> anyhow::Result<String> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(base_url)
        .await
        .with_context(|| format!("cannot connect to postgres at {base_url}"))?;
    // Earlier runs' databases go too: left behind, they cost disk, and
    // autovacuum working through them ran into the next run and its figures.
    let earlier: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'kairos\\_bench\\_%'",
    )
    .fetch_all(&mut conn)
    .await?;
    for old in earlier.iter().map(String::as_str).chain([name]) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {old} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let (base, _) = base_url
        .rsplit_once('/')
        .context("postgres url has no database part")?;
    Ok(format!("{base}/{name}"))
}
