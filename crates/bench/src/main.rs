//! kairos-bench: measures Kairos against raw JetStream on the same NATS
//! server in the same run, and prints a table plus one JSON line per scenario.
//!
//! # Layout
//! - `raw`: the raw JetStream baselines (publish, relay pipeline, naive cycling).
//! - `server`: kairos-server as a child process, with its CPU and RSS from /proc.
//! - `nats`: kill -9 and restart of nats-server, and the survival check.
//! - `scenarios`: booking, workers, lateness samples.
//! - `plot`: the lateness CDF.

mod nats;
mod plot;
mod raw;
mod scenarios;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use clap::{Parser, ValueEnum};
use kairos_client::Client;
use serde_json::{Value, json};

// glibc malloc showed up at ~10 % of CPU in a burst profile (malloc, free,
// unlink_chunk, malloc_consolidate); mimalloc is faster for many small,
// short-lived allocations and fragments less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::scenarios::{Lateness, quantile};
use crate::server::{ServerProcess, ServerSettings, proc_usage};

/// Scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Booking throughput: ScheduleBatch and single Schedule vs raw publish.
    Ingest,
    /// N tasks due at one instant: lateness and drain rate vs the raw relay pipeline.
    Burst,
    /// N tasks waiting an hour: messages published, CPU and RSS while idle, vs naive cycling.
    Idle,
    /// Half of N tasks cancelled just before due: cancels/s, and none of them runs.
    Cancel,
    /// ScheduleBatch against per-message-fsync publish, then kill -9 of
    /// nats-server: every acknowledged task must survive.
    Durable,
    /// Tasks due continuously at `--rate` for `--duration`, booked just ahead: lateness.
    Steady,
    /// The payment gateway: a queue with max_concurrency 2 and 1 s handlers on
    /// three workers of 8 slots: throughput (2/s is the limit) and the
    /// highest concurrency observed.
    Limited,
    /// ingest, burst, steady, cancel, limited and idle in turn.
    All,
}

/// Benchmarks Kairos against raw JetStream on the same NATS server.
#[derive(Debug, Parser)]
#[command(name = "kairos-bench", version)]
struct Args {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Tasks per scenario (default: ingest 200,000; burst 100,000; idle 1,000,000; cancel 20,000).
    #[arg(long)]
    tasks: Option<usize>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// NATS server (JetStream enabled); the Kairos streams on it are deleted first.
    #[arg(
        long,
        env = "KAIROS_NATS_URL",
        default_value = "nats://127.0.0.1:24222"
    )]
    nats_url: String,
    /// How the NATS server syncs to disk, for the report: `default` or `always`.
    #[arg(long, default_value = "default")]
    nats_sync: String,
    /// Redis (flushed before each scenario).
    #[arg(
        long,
        env = "KAIROS_REDIS_URL",
        default_value = "redis://127.0.0.1:26379"
    )]
    redis_url: String,
    /// kairos-server binary (release build).
    #[arg(long, default_value = "target/release/kairos-server")]
    server_bin: PathBuf,
    /// Postgres server URL: each run gets a fresh database on it (default: SQLite).
    #[arg(long)]
    postgres_url: Option<String>,
    /// nats-server config file, so the durable scenario can restart it.
    #[arg(long)]
    nats_conf: Option<PathBuf>,
    /// nats-server pid file, so the durable scenario can kill it (rewritten on restart).
    #[arg(long)]
    nats_pid_file: Option<PathBuf>,
    /// redis-server pid file, so the burst can report Redis's CPU.
    #[arg(long)]
    redis_pid_file: Option<PathBuf>,
    /// Postgres's `postmaster.pid`, so the burst can report Postgres's CPU
    /// (the postmaster and its backends).
    #[arg(long)]
    postgres_pid_file: Option<PathBuf>,
    /// Folder for the SQLite files of each run.
    #[arg(long, default_value = ".kairos/bench")]
    work_dir: PathBuf,
    /// Folder for each server run's log, kept after the bench.
    #[arg(long, default_value = ".kairos/bench-logs")]
    log_dir: PathBuf,
    /// Log filter of the servers (`KAIROS_LOG`, into `--log-dir`) and of the
    /// bench's own workers (stderr), e.g. `kairos_worker=debug,warn` to see
    /// why a run stalled.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Worker processes' share: workers started in the bench process.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Local concurrency of each worker.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// Tasks released ahead that each worker holds until their due time.
    #[arg(long, default_value_t = 1_000)]
    worker_hold: usize,
    /// How long the idle scenario watches.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Tasks per second falling due in the steady scenario.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// How long tasks keep falling due in the steady scenario.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Draw the burst lateness CDF (Kairos beside the raw pipeline) to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Rounds of the ingest scenario, each a raw publish right before a
    /// ScheduleBatch of the same size; the ratio is the median round's.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// CPU seconds of the processes beside kairos-server (see `Bench::others_cpu`).
struct OthersCpu {
    nats: f64,
    redis: f64,
    /// The postmaster and its children; 0 without a pid file.
    postgres: f64,
    /// This process: the in-process workers, or the raw baseline's client.
    workers: f64,
}

struct Bench {
    args: Args,
    js: async_nats::jetstream::Context,
    payload: Bytes,
    run: u32,
}

impl Bench {
    /// Memory Redis holds (`used_memory`, MB): what the waiting tasks' claims cost it.
    async fn redis_used_mb(&self) -> anyhow::Result<f64> {
        let mut redis = redis::Client::open(self.args.redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .context("redis")?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut redis)
            .await?;
        let bytes: f64 = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .context("INFO memory without used_memory")?
            .trim()
            .parse()?;
        Ok(bytes / 1e6)
    }

    /// Starts a fresh Kairos: streams deleted, Redis flushed, a new SQLite file.
    async fn fresh_server(&mut self, env: &[(&str, &str)]) -> anyhow::Result<ServerProcess> {
        for stream in [
            kairos_proto::wire::TASKS_STREAM,
            kairos_proto::wire::READY_STREAM,
        ] {
            let _ = self.js.delete_stream(stream).await;
        }
        let mut redis = redis::Client::open(self.args.redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .context("redis")?;
        // ASYNC: freeing millions of claims can outlast the response timeout.
        let () = redis::cmd("FLUSHALL")
            .arg("ASYNC")
            .query_async(&mut redis)
            .await?;
        self.run += 1;
        let name = format!("kairos_bench_{}_{}", std::process::id(), self.run);
        let database_url = match &self.args.postgres_url {
            Some(url) => server::fresh_postgres_database(url, &name).await?,
            None => {
                std::fs::create_dir_all(&self.args.work_dir)?;
                let db = self.args.work_dir.join(format!("{name}.db"));
                format!("sqlite://{}", db.display())
            }
        };
        let settings = ServerSettings {
            binary: self.args.server_bin.clone(),
            nats_url: self.args.nats_url.clone(),
            redis_url: self.args.redis_url.clone(),
            database_url,
            log: self.args.log_dir.join(format!("{name}.log")),
            env: std::iter::once(("KAIROS_LOG".to_owned(), self.args.log.clone()))
                .chain(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
                .collect(),
        };
        ServerProcess::start(&settings).await
    }

    /// CPU seconds so far of nats-server, redis-server and this process (the
    /// in-process workers), for the per-process split of a phase.
    fn others_cpu(&self) -> OthersCpu {
        let pid_in = |file: &Option<PathBuf>| -> Option<u32> {
            let text = std::fs::read_to_string(file.as_ref()?).ok()?;
            // postmaster.pid holds more lines; the pid is the first.
            text.lines().next()?.trim().parse().ok()
        };
        let of_pid_file =
            |file: &Option<PathBuf>| pid_in(file).map_or(0.0, |pid| proc_usage(pid).0);
        OthersCpu {
            nats: of_pid_file(&self.args.nats_pid_file),
            redis: of_pid_file(&self.args.redis_pid_file),
            postgres: pid_in(&self.args.postgres_pid_file).map_or(0.0, server::tree_cpu),
            workers: proc_usage(std::process::id()).0,
        }
    }

    fn base(&self, scenario: &str, tasks: usize) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("scenario".into(), json!(scenario));
        m.insert("tasks".into(), json!(tasks));
        m.insert("payload_bytes".into(), json!(self.args.payload_bytes));
        m.insert("nats_sync".into(), json!(self.args.nats_sync));
        let store = if self.args.postgres_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        m.insert("store".into(), json!(store));
        m
    }

    async fn ingest(&mut self) -> anyhow::Result<Value> {
        let n = self.args.tasks.unwrap_or(200_000);
        let server = self.fresh_server(&[]).await?;
        let client = Client::connect(server.url.clone()).await?;
        let due = Utc::now() + chrono::Duration::hours(1);
        let (cpu0, _, _) = server.usage();
        // The host's speed drifts by more than most changes measured here,
        // over seconds: each round's ratio compares two phases run back to
        // back, and the median round is reported.
        let mut rounds = Vec::new();
        for round in 1..=self.args.rounds {
            eprintln!("ingest: round {round}: raw publish, then ScheduleBatch, of {n}");
            let raw = raw::publish_rate(&self.js, n, self.payload.clone()).await?;
            let (batch, _) =
                scenarios::ingest_batches(&client, "bench", n, self.payload.clone(), |_| due)
                    .await?;
            rounds.push((raw, batch));
        }
        let mut by_ratio = rounds.clone();
        by_ratio.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
        let (raw, batch_rate) = by_ratio[by_ratio.len() / 2];
        let singles = n.min(50_000);
        let single_rate =
            scenarios::ingest_singles(&client, "bench", singles, self.payload.clone(), 256, due)
                .await?;
        let (cpu1, _, peak) = server.usage();
        let mut m = self.base("ingest", n);
        m.insert("rounds".into(), json!(rounds.len()));
        m.insert(
            "round_ratios".into(),
            json!(
                rounds
                    .iter()
                    .map(|(r, b)| round3(b / r))
                    .collect::<Vec<_>>()
            ),
        );
        m.insert("raw_publish_per_s".into(), json!(raw.round()));
        m.insert("batch_per_s".into(), json!(batch_rate.round()));
        m.insert("single_per_s".into(), json!(single_rate.round()));
        m.insert("single_tasks".into(), json!(singles));
        m.insert("ingest_ratio".into(), json!(round3(batch_rate / raw)));
        m.insert("single_ratio".into(), json!(round3(single_rate / raw)));
        m.insert("cpu_s".into(), json!(round3(cpu1 - cpu0)));
        m.insert("rss_mb".into(), json!(peak.round()));
        m.insert(
            "goal".into(),
            json!(verdict(
                batch_rate / raw >= 0.5,
                "ScheduleBatch >= 0.5 x raw publish"
            )),
        );
        Ok(Value::Object(m))
    }

    async fn burst(&mut self) -> anyhow::Result<Value> {
        let n = self.args.tasks.unwrap_or(100_000);
        eprintln!("burst: raw relay pipeline of {n} messages");
        let raw0 = self.others_cpu();
        let (raw_rate, raw_arrivals) = raw::relay_rate(&self.js, n, self.payload.clone()).await?;
        let raw1 = self.others_cpu();
        let server = self.fresh_server(&[]).await?;
        let client = Client::connect(server.url.clone()).await?;
        // Far enough ahead that booking and pulling into memory finish first.
        let lead = Duration::from_secs(10) + Duration::from_secs_f64(n as f64 / 10_000.0);
        let due = Utc::now() + chrono::Duration::from_std(lead)?;
        let lateness = Lateness::default();
        let workers = scenarios::start_workers(
            &server,
            &self.args.nats_url,
            "burst",
            self.args.workers,
            (self.args.worker_concurrency, self.args.worker_hold),
            &lateness,
        )?;
        let (_, _) =
            scenarios::ingest_batches(&client, "burst", n, self.payload.clone(), |_| due).await?;
        if Utc::now() >= due {
            anyhow::bail!("booking took longer than the lead; rerun with fewer tasks");
        }
        // CPU is counted from here, not from the due time: whatever the
        // server does ahead of the instant (pulling the bucket, releasing
        // tasks within the release lead) is part of each task's cost.
        let (cpu0, _, _) = server.usage();
        let others0 = self.others_cpu();
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        eprintln!(
            "burst: {n} tasks booked, due in {:.1} s",
            wait.as_secs_f64()
        );
        // How much of the burst went ahead of the instant (KAIROS_RELEASE_LEAD),
        // read just before it: nothing has started yet, so every message in
        // the ready stream was released ahead.
        let look = Duration::from_millis(20);
        tokio::time::sleep(wait.saturating_sub(look)).await;
        let (ahead, _) =
            scenarios::stream_state(&self.js, kairos_proto::wire::READY_STREAM).await?;
        tokio::time::sleep((due - Utc::now()).to_std().unwrap_or_default()).await;
        let (at_due, _, _) = server.usage();
        let others_at_due = self.others_cpu();
        let done = scenarios::wait_runs(&lateness, n, Duration::from_secs(600)).await;
        let (cpu1, _, peak) = server.usage();
        let others1 = self.others_cpu();
        workers.cancel();
        drop(server);
        anyhow::ensure!(done, "only {} of {n} tasks ran", lateness.count());
        eprintln!("burst: NATS's own scheduler (Nats-Schedule: @at) with {n} messages");
        let nats_lead = Duration::from_secs(5) + Duration::from_secs_f64(n as f64 / 20_000.0);
        let nats_sched =
            raw::nats_schedule_lateness(&self.js, n, self.payload.clone(), nats_lead).await?;
        let sorted = lateness.sorted();
        let drain_s = sorted.last().copied().unwrap_or(0.0) / 1000.0;
        let drain_rate = n as f64 / drain_s.max(1e-9);
        let p99_goal_ms = 1.25 * n as f64 / raw_rate * 1000.0;
        let (first, p50, p99, max) = (
            sorted[0],
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.99),
            *sorted.last().expect("samples"),
        );
        if let Some(path) = &self.args.plot {
            plot::lateness_cdf(
                &path.display().to_string(),
                &format!(
                    "burst: {n} tasks due at one instant ({} B payloads)",
                    self.args.payload_bytes
                ),
                &[
                    ("Kairos (due → handler start)", &sorted),
                    ("raw relay pipeline (start → consumer)", &raw_arrivals),
                    (
                        "NATS Nats-Schedule @at (due → consumer)",
                        nats_sched.as_deref().unwrap_or_default(),
                    ),
                ],
            )?;
            eprintln!("burst: plot written to {}", path.display());
        }
        let mut m = self.base("burst", n);
        m.insert("raw_relay_per_s".into(), json!(raw_rate.round()));
        m.insert("drain_per_s".into(), json!(drain_rate.round()));
        m.insert("drain_ratio".into(), json!(round3(drain_rate / raw_rate)));
        m.insert("first_ms".into(), json!(round3(first)));
        m.insert("p50_ms".into(), json!(round3(p50)));
        m.insert("p99_ms".into(), json!(round3(p99)));
        m.insert("max_ms".into(), json!(round3(max)));
        m.insert("drain_s".into(), json!(round3(drain_s)));
        m.insert("released_ahead".into(), json!(ahead));
        m.insert("cpu_s".into(), json!(round3(cpu1 - cpu0)));
        m.insert("rss_mb".into(), json!(peak.round()));
        // Where the burst's CPU goes, beside the relay's, in µs per task. One
        // decimal: /proc counts in 10 ms ticks, 0.1 µs per task at 100,000,
        // and changes of a few percent are invisible in whole microseconds.
        let per_task = |s: f64| json!((s * 1e7 / n as f64).round() / 10.0);
        // `drain_*`: the part of it spent from the due time on, what the
        // instant itself costs once the release lead has done what it could.
        let postgres = self.args.postgres_pid_file.is_some();
        let mut per_process = |prefix: &str, server_s: f64, from: &OthersCpu| {
            for (name, cpu_s) in [
                ("nats", others1.nats - from.nats),
                ("redis", others1.redis - from.redis),
                ("postgres", others1.postgres - from.postgres),
                ("workers", others1.workers - from.workers),
                ("server", server_s),
            ] {
                if name != "postgres" || postgres {
                    m.insert(format!("{prefix}{name}_us_per_task"), per_task(cpu_s));
                }
            }
        };
        per_process("", cpu1 - cpu0, &others0);
        per_process("drain_", cpu1 - at_due, &others_at_due);
        m.insert(
            "raw_relay_nats_us_per_task".into(),
            per_task(raw1.nats - raw0.nats),
        );
        m.insert(
            "raw_relay_client_us_per_task".into(),
            per_task(raw1.workers - raw0.workers),
        );
        let mut goals = vec![
            verdict(first <= 10.0, "first task <= 10 ms late"),
            verdict(drain_rate / raw_rate >= 0.8, "drain >= 0.8 x raw relay"),
            verdict(p99 <= p99_goal_ms, &format!("p99 <= {p99_goal_ms:.0} ms")),
        ];
        match &nats_sched {
            Some(nats) => {
                let nats_drain_s = nats.last().copied().unwrap_or(0.0) / 1000.0;
                m.insert("nats_schedule_first_ms".into(), json!(round3(nats[0])));
                m.insert(
                    "nats_schedule_p50_ms".into(),
                    json!(round3(quantile(nats, 0.5))),
                );
                m.insert(
                    "nats_schedule_p99_ms".into(),
                    json!(round3(quantile(nats, 0.99))),
                );
                m.insert("nats_schedule_drain_s".into(), json!(round3(nats_drain_s)));
                goals.push(verdict(
                    drain_s < nats_drain_s && first < nats[0],
                    "beats NATS Nats-Schedule (first and last)",
                ));
            }
            None => {
                m.insert(
                    "nats_schedule".into(),
                    json!("not supported by this server"),
                );
            }
        }
        m.insert("goal".into(), json!(goals));
        Ok(Value::Object(m))
    }

    async fn durable(&mut self) -> anyhow::Result<Value> {
        anyhow::ensure!(
            self.args.nats_sync == "always",
            "durable needs NATS with sync_interval: always; run `./scripts/bench.sh durable`"
        );
        let (Some(conf), Some(pid_file)) =
            (self.args.nats_conf.clone(), self.args.nats_pid_file.clone())
        else {
            anyhow::bail!("durable needs --nats-conf and --nats-pid-file to kill and restart NATS");
        };
        let n = self.args.tasks.unwrap_or(50_000);
        let sequential = 2_000.min(n);
        eprintln!("durable: raw publish of {sequential} messages, one fsync each");
        let raw_seq =
            raw::publish_sequential_rate(&self.js, sequential, self.payload.clone()).await?;
        eprintln!("durable: raw publish of {n} messages, 1,024 in flight");
        let raw = raw::publish_rate(&self.js, n, self.payload.clone()).await?;
        eprintln!("durable: raw atomic batches of {n} messages (1,000 per batch, 4 in flight)");
        let raw_atomic =
            raw::publish_atomic_rate(&self.js, n, self.payload.clone(), 1000, 4).await?;
        let server = self.fresh_server(&[]).await?;
        let client = Client::connect(server.url.clone()).await?;
        let due = Utc::now() + chrono::Duration::hours(1);
        let (cpu0, _, _) = server.usage();
        let (batch_rate, ids) =
            scenarios::ingest_batches(&client, "durable", n, self.payload.clone(), |_| due).await?;
        let (cpu1, _, peak) = server.usage();

        eprintln!("durable: kill -9 nats-server, then start it again");
        nats::kill9_and_restart(&conf, &pid_file, &self.args.nats_url).await?;
        let missing = nats::missing_tasks(&self.js, &ids).await?;
        drop(server);

        let mut m = self.base("durable", n);
        m.insert("raw_fsync_publish_per_s".into(), json!(raw_seq.round()));
        m.insert("raw_publish_per_s".into(), json!(raw.round()));
        m.insert(
            "raw_atomic_batch_per_s".into(),
            raw_atomic.map_or(json!("not supported"), |r| json!(r.round())),
        );
        m.insert("batch_per_s".into(), json!(batch_rate.round()));
        m.insert("fsync_ratio".into(), json!(round3(batch_rate / raw_seq)));
        m.insert("ingest_ratio".into(), json!(round3(batch_rate / raw)));
        m.insert("acknowledged".into(), json!(ids.len()));
        m.insert("lost_after_kill".into(), json!(missing));
        m.insert("cpu_s".into(), json!(round3(cpu1 - cpu0)));
        m.insert("rss_mb".into(), json!(peak.round()));
        m.insert(
            "goal".into(),
            json!([
                verdict(
                    batch_rate / raw_seq >= 5.0,
                    "ScheduleBatch >= 5 x per-message-fsync publish"
                ),
                verdict(missing == 0, "every acknowledged task survives kill -9"),
            ]),
        );
        Ok(Value::Object(m))
    }

    async fn steady(&mut self) -> anyhow::Result<Value> {
        let rate = self.args.rate;
        let duration = self.args.duration;
        anyhow::ensure!(rate > 0.0, "--rate must be positive");
        let n = (rate * duration.as_secs_f64()).round() as usize;
        let raw_n = n.min(100_000);
        eprintln!("steady: raw relay pipeline of {raw_n} messages");
        let (raw_rate, _) = raw::relay_rate(&self.js, raw_n, self.payload.clone()).await?;
        let server = self.fresh_server(&[]).await?;
        let client = Client::connect(server.url.clone()).await?;
        let lateness = Lateness::default();
        let workers = scenarios::start_workers(
            &server,
            &self.args.nats_url,
            "steady",
            self.args.workers,
            (self.args.worker_concurrency, self.args.worker_hold),
            &lateness,
        )?;
        // Each batch is booked 2 s before its first task is due, so booking,
        // bucket pulls and releases all run at once, as in production.
        let lead = Duration::from_secs(2);
        let start = Utc::now() + chrono::Duration::seconds(3);
        eprintln!("steady: {n} tasks due at {rate}/s for {duration:?}");
        let (cpu0, _, _) = server.usage();
        let paced = scenarios::book_paced(
            &client,
            "steady",
            n,
            self.payload.clone(),
            rate,
            start,
            lead,
        )
        .await?;
        let done = scenarios::wait_runs(&lateness, n, Duration::from_secs(600)).await;
        let (cpu1, _, peak) = server.usage();
        workers.cancel();
        anyhow::ensure!(done, "only {} of {n} tasks ran", lateness.count());
        let sorted = lateness.sorted();
        let (p50, p99, max) = (
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.99),
            *sorted.last().expect("samples"),
        );
        // Where in the run the late tasks fell: a tail at the start is
        // warm-up, one in the middle a stall.
        let series = lateness.by_second(start);
        for s in &series {
            eprintln!(
                "steady: second {:>3}: {:>6} tasks, p50 {:>9.1} ms, p99 {:>9.1} ms, max {:>9.1} ms",
                s.second, s.tasks, s.p50_ms, s.p99_ms, s.max_ms
            );
        }
        let mut m = self.base("steady", n);
        m.insert(
            "p99_ms_by_second".into(),
            json!(series.iter().map(|s| round3(s.p99_ms)).collect::<Vec<_>>()),
        );
        m.insert("rate_per_s".into(), json!(rate));
        m.insert("duration_s".into(), json!(duration.as_secs_f64()));
        m.insert("raw_relay_per_s".into(), json!(raw_rate.round()));
        m.insert("rate_ratio".into(), json!(round3(rate / raw_rate)));
        m.insert("booked_per_s".into(), json!(paced.rate.round()));
        m.insert("late_batches".into(), json!(paced.late_batches));
        m.insert(
            "min_booking_margin_ms".into(),
            json!(round3(paced.min_margin_ms)),
        );
        m.insert("p50_ms".into(), json!(round3(p50)));
        m.insert("p99_ms".into(), json!(round3(p99)));
        m.insert("max_ms".into(), json!(round3(max)));
        m.insert("cpu_s".into(), json!(round3(cpu1 - cpu0)));
        m.insert("rss_mb".into(), json!(peak.round()));
        m.insert(
            "goal".into(),
            json!([
                verdict(p99 <= 50.0, "p99 <= 50 ms"),
                verdict(paced.late_batches == 0, "every batch booked before due"),
            ]),
        );
        Ok(Value::Object(m))
    }

    async fn idle(&mut self) -> anyhow::Result<Value> {
        let n = self.args.tasks.unwrap_or(1_000_000);
        let window = self.args.window;
        // The look-ahead covers the due time, so every task is held in memory.
        let server = self.fresh_server(&[("KAIROS_LOOKAHEAD", "2h")]).await?;
        let client = Client::connect(server.url.clone()).await?;
        let due = Utc::now() + chrono::Duration::hours(1);
        scenarios::ingest_batches(&client, "idle", n, self.payload.clone(), |_| due).await?;
        let started = Instant::now();
        while scenarios::held(&self.js).await? < n as u64 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "tasks never all held"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("idle: {n} tasks held; watching for {window:?}");
        let redis_mb = self.redis_used_mb().await?;
        let (_, seq0) = scenarios::stream_state(&self.js, kairos_proto::wire::TASKS_STREAM).await?;
        let (_, ready0) =
            scenarios::stream_state(&self.js, kairos_proto::wire::READY_STREAM).await?;
        let (cpu0, _, _) = server.usage();
        tokio::time::sleep(window).await;
        let (cpu1, rss, peak) = server.usage();
        let (_, seq1) = scenarios::stream_state(&self.js, kairos_proto::wire::TASKS_STREAM).await?;
        let (_, ready1) =
            scenarios::stream_state(&self.js, kairos_proto::wire::READY_STREAM).await?;
        let published = (seq1 - seq0) + (ready1 - ready0);
        let cpu_s = cpu1 - cpu0;
        let core_pct = cpu_s / window.as_secs_f64() * 100.0;
        drop(server);
        for stream in [
            kairos_proto::wire::TASKS_STREAM,
            kairos_proto::wire::READY_STREAM,
        ] {
            let _ = self.js.delete_stream(stream).await;
        }

        eprintln!("idle: naive cycling comparison over {window:?}");
        let me = std::process::id();
        let (naive_cpu0, _, _) = proc_usage(me);
        let naive_published = raw::naive_cycling(&self.js, n, self.payload.clone(), window).await?;
        let (naive_cpu1, _, _) = proc_usage(me);

        let mut m = self.base("idle", n);
        m.insert("window_s".into(), json!(window.as_secs_f64()));
        m.insert("published".into(), json!(published));
        m.insert("cpu_s".into(), json!(round3(cpu_s)));
        m.insert("core_pct".into(), json!(round3(core_pct)));
        m.insert("rss_mb".into(), json!(rss.round()));
        m.insert("peak_rss_mb".into(), json!(peak.round()));
        m.insert("redis_mb".into(), json!(round3(redis_mb)));
        m.insert("naive_published".into(), json!(naive_published));
        m.insert("naive_cpu_s".into(), json!(round3(naive_cpu1 - naive_cpu0)));
        m.insert(
            "goal".into(),
            json!([
                verdict(published == 0, "0 messages while waiting"),
                verdict(core_pct <= 1.0, "<= 1 % of one core"),
                verdict(rss <= 300.0, "RSS <= 300 MB"),
            ]),
        );
        Ok(Value::Object(m))
    }

    async fn limited(&mut self) -> anyhow::Result<Value> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let n = self.args.tasks.unwrap_or(40);
        let server = self.fresh_server(&[]).await?;
        let mut client = Client::connect(server.url.clone()).await?;
        client
            .create_queue(
                "limited",
                kairos_client::QueueChange::new().max_concurrency(2),
            )
            .await?;
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let ends = Arc::new(std::sync::Mutex::new(Vec::new()));
        let token = tokio_util::sync::CancellationToken::new();
        for i in 0..3 {
            let (running, peak, ends) = (running.clone(), peak.clone(), ends.clone());
            let handler = kairos_worker::handler_fn(move |_task| {
                let (running, peak, ends) = (running.clone(), peak.clone(), ends.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    ends.lock().expect("ends").push(Instant::now());
                    Ok::<(), kairos_worker::HandlerError>(())
                }
            });
            let worker = kairos_worker::Worker::builder()
                .server(server.url.clone())
                .nats(&self.args.nats_url)
                .queue("limited", handler)
                .concurrency(8)
                .worker_id(format!("limited-{i}"))
                .build()?;
            let token = token.clone();
            tokio::spawn(async move {
                if let Err(err) = worker.run(token).await {
                    eprintln!("worker failed: {err}");
                }
            });
        }
        let started = Instant::now();
        scenarios::ingest_batches(&client, "limited", n, self.payload.clone(), |_| Utc::now())
            .await?;
        let deadline = started + Duration::from_secs(n as u64 + 60);
        while ends.lock().expect("ends").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        token.cancel();
        let done = ends.lock().expect("ends").len();
        let took = started.elapsed().as_secs_f64();
        let per_s = done as f64 / took;
        let peak = peak.load(Ordering::SeqCst);
        let mut m = self.base("limited", n);
        m.insert("max_concurrency".into(), json!(2));
        m.insert("handler_s".into(), json!(1.0));
        m.insert("workers".into(), json!("3 x 8 slots"));
        m.insert("completed".into(), json!(done));
        m.insert("elapsed_s".into(), json!(round3(took)));
        m.insert("throughput_per_s".into(), json!(round3(per_s)));
        m.insert("peak_concurrency".into(), json!(peak));
        m.insert(
            "goal".into(),
            json!([
                verdict(peak <= 2, "never more than 2 at once"),
                verdict(
                    done == n && per_s >= 1.8,
                    "throughput at least 90 % of the 2/s limit"
                ),
            ]),
        );
        Ok(Value::Object(m))
    }

    async fn cancel(&mut self) -> anyhow::Result<Value> {
        use futures::StreamExt as _;
        let n = self.args.tasks.unwrap_or(20_000);
        let server = self.fresh_server(&[]).await?;
        let client = Client::connect(server.url.clone()).await?;
        let lead = Duration::from_secs(15) + Duration::from_secs_f64(n as f64 / 2_000.0);
        let due = Utc::now() + chrono::Duration::from_std(lead)?;
        let lateness = Lateness::default();
        let workers = scenarios::start_workers(
            &server,
            &self.args.nats_url,
            "cancel",
            1,
            (256, self.args.worker_hold),
            &lateness,
        )?;
        let (_, ids) =
            scenarios::ingest_batches(&client, "cancel", n, self.payload.clone(), |_| due).await?;
        let doomed: Vec<String> = ids.iter().step_by(2).cloned().collect();
        let started = Instant::now();
        let mut calls = futures::stream::iter(doomed.iter().cloned().map(|id| {
            let mut client = client.clone();
            async move { (id.clone(), client.cancel(&id).await) }
        }))
        .buffer_unordered(64);
        let mut cancelled = std::collections::HashSet::new();
        let mut refused = 0usize;
        while let Some((id, result)) = calls.next().await {
            match result {
                Ok(_) => {
                    cancelled.insert(id);
                }
                Err(_) => refused += 1,
            }
        }
        let cancel_rate = doomed.len() as f64 / started.elapsed().as_secs_f64();
        let before_due = Utc::now() < due;
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let expected = n - cancelled.len();
        let done = scenarios::wait_runs(&lateness, expected, Duration::from_secs(300)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        workers.cancel();
        let ran = lateness.ran_ids();
        let cancelled_ran = ran.iter().filter(|id| cancelled.contains(*id)).count();
        let mut m = self.base("cancel", n);
        m.insert("cancels".into(), json!(doomed.len()));
        m.insert("cancel_per_s".into(), json!(cancel_rate.round()));
        m.insert("cancelled".into(), json!(cancelled.len()));
        m.insert("refused".into(), json!(refused));
        m.insert("all_before_due".into(), json!(before_due));
        m.insert("ran".into(), json!(ran.len()));
        m.insert("cancelled_that_ran".into(), json!(cancelled_ran));
        m.insert(
            "goal".into(),
            json!([
                verdict(cancelled_ran == 0, "no cancelled task runs"),
                verdict(done && ran.len() == expected, "every other task runs once"),
            ]),
        );
        Ok(Value::Object(m))
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn verdict(met: bool, goal: &str) -> String {
    format!("{} {goal}", if met { "MET" } else { "MISSED" })
}

fn print_table(result: &Value) {
    let Some(map) = result.as_object() else {
        return;
    };
    eprintln!();
    eprintln!("── {} ──", map["scenario"].as_str().unwrap_or("?"));
    for (key, value) in map {
        if key == "scenario" || key == "goal" {
            continue;
        }
        eprintln!("  {key:<22} {value}");
    }
    match &map.get("goal") {
        Some(Value::Array(goals)) => goals
            .iter()
            .for_each(|g| eprintln!("  goal: {}", g.as_str().unwrap_or(""))),
        Some(Value::String(goal)) => eprintln!("  goal: {goal}"),
        _ => {}
    }
    eprintln!();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .try_init();
    kairos_worker::small_pages();
    anyhow::ensure!(
        args.server_bin.exists(),
        "{} not found: build it with `cargo build --release -p kairos-server`",
        args.server_bin.display()
    );
    let client = async_nats::connect(&args.nats_url)
        .await
        .with_context(|| format!("cannot connect to nats at {}", args.nats_url))?;
    let js = async_nats::jetstream::new(client);
    let payload = Bytes::from(vec![b'x'; args.payload_bytes]);
    let scenario = args.scenario;
    let mut bench = Bench {
        args,
        js,
        payload,
        run: 0,
    };
    let order: &[Scenario] = match scenario {
        Scenario::All => &[
            Scenario::Ingest,
            Scenario::Burst,
            Scenario::Steady,
            Scenario::Cancel,
            Scenario::Limited,
            Scenario::Idle,
        ],
        _ => std::slice::from_ref(&scenario),
    };
    for s in order {
        let result = match s {
            Scenario::Ingest => bench.ingest().await?,
            Scenario::Burst => bench.burst().await?,
            Scenario::Idle => bench.idle().await?,
            Scenario::Cancel => bench.cancel().await?,
            Scenario::Steady => bench.steady().await?,
            Scenario::Durable => bench.durable().await?,
            Scenario::Limited => bench.limited().await?,
            Scenario::All => unreachable!("expanded above"),
        };
        print_table(&result);
        println!("{result}");
    }
    let _ = std::fs::remove_dir_all(&bench.args.work_dir);
    Ok(())
}
