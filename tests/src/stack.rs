//! A whole Kairos stack for one test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Parser as _;
use kairos_client::{Client, Task, TaskState};
use kairos_server::ServerConfig;
use kairos_worker::{Handler, Worker};
use sqlx::Connection as _;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::procs::{NatsServer, RedisServer};

/// The database's write lock, held by a test (see [`Stack::hold_sql_writes`]).
#[derive(Debug)]
pub enum SqlWriteLock {
    /// A SQLite connection inside `BEGIN IMMEDIATE`.
    Sqlite(sqlx::SqliteConnection),
    /// A Postgres connection holding SHARE locks on the task tables.
    Postgres(sqlx::PgConnection),
}

impl SqlWriteLock {
    /// Lets the servers' writes go on.
    pub async fn release(self) {
        match self {
            Self::Sqlite(mut conn) => {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut conn)
                    .await
                    .expect("unlock");
            }
            Self::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut conn)
                    .await
                    .expect("unlock");
            }
        }
    }
}

/// Which SQL backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file.
    Sqlite,
    /// A fresh database in the Postgres that scripts/test.sh started.
    Postgres,
}

/// A running in-process kairos-server.
#[derive(Debug)]
pub struct ServerHandle {
    /// gRPC address, `http://127.0.0.1:port`.
    pub url: String,
    token: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// Kills the replica abruptly: no lease release, no flush, held tasks unacknowledged.
    pub async fn kill(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Shuts the replica down gracefully and returns its result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.token.cancel();
        match self.handle.take() {
            Some(handle) => handle.await?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// A running in-process worker.
#[derive(Debug)]
pub struct WorkerHandle {
    token: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Shuts the worker down gracefully.
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Kills the worker abruptly.
    pub async fn kill(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// One run of a handler, as the test handler saw it.
#[derive(Debug, Clone)]
pub struct Run {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// When the handler started.
    pub at: DateTime<Utc>,
    /// When the task was due.
    pub due_at: DateTime<Utc>,
    /// Worker.
    pub worker_id: String,
}

/// Every handler run of a test, shared by its workers.
#[derive(Debug, Clone, Default)]
pub struct RunLog(Arc<Mutex<Vec<Run>>>);

impl RunLog {
    /// Records a run of `task`.
    pub fn record(&self, task: &kairos_worker::TaskContext) {
        self.0.lock().expect("run log").push(Run {
            task_id: task.id().to_owned(),
            attempt: task.attempt(),
            at: Utc::now(),
            due_at: task.due_at(),
            worker_id: task.worker_id().to_owned(),
        });
    }

    /// Returns a handler that records each run here and succeeds.
    pub fn handler(&self) -> impl Handler {
        let log = self.clone();
        kairos_worker::handler_fn(move |task| {
            let log = log.clone();
            async move {
                log.record(&task);
                Ok::<(), kairos_worker::HandlerError>(())
            }
        })
    }

    /// Returns a handler that records each run here, then takes `busy`
    /// before it succeeds.
    pub fn slow_handler(&self, busy: Duration) -> impl Handler {
        let log = self.clone();
        kairos_worker::handler_fn(move |task| {
            let log = log.clone();
            async move {
                log.record(&task);
                tokio::time::sleep(busy).await;
                Ok::<(), kairos_worker::HandlerError>(())
            }
        })
    }

    /// Returns a handler that records each run here and never returns, for
    /// a worker that then dies. Each running call holds a clone of `alive`,
    /// so a test can tell when its handler is gone.
    pub fn hanging_handler(&self, alive: Arc<()>) -> impl Handler {
        let log = self.clone();
        kairos_worker::handler_fn(move |task| {
            let (log, alive) = (log.clone(), alive.clone());
            async move {
                let _alive = alive;
                log.record(&task);
                std::future::pending::<()>().await;
                Ok::<(), kairos_worker::HandlerError>(())
            }
        })
    }

    /// Returns every run so far.
    pub fn runs(&self) -> Vec<Run> {
        self.0.lock().expect("run log").clone()
    }

    /// Returns how many times each task ran.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for run in self.runs() {
            *counts.entry(run.task_id).or_insert(0) += 1;
        }
        counts
    }

    /// Returns the number of runs.
    pub fn len(&self) -> usize {
        self.0.lock().expect("run log").len()
    }

    /// Tells whether nothing ran.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `n` runs happened, or panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} runs after {timeout:?}",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Real NATS, Redis and SQL for one test, plus the servers and workers it starts.
#[derive(Debug)]
pub struct Stack {
    /// The NATS server.
    pub nats: NatsServer,
    /// The Redis server.
    pub redis: RedisServer,
    /// Database URL shared by every replica.
    pub database_url: String,
    /// Which backend.
    pub backend: Backend,
    _dir: TempDir,
}

impl Stack {
    /// Starts NATS and Redis and creates an empty database.
    pub async fn start(backend: Backend) -> Self {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("kairos.db").display()),
            Backend::Postgres => fresh_postgres_database().await,
        };
        Self {
            nats: NatsServer::start(),
            redis: RedisServer::start(),
            database_url,
            backend,
            _dir: dir,
        }
    }

    /// Returns a server config for this stack, with test-friendly timings.
    pub fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::parse_from(["kairos-server"]);
        config.nats_url = self.nats.url();
        config.redis_url = self.redis.url();
        config.database_url = self.database_url.clone();
        config.lease_ttl = Duration::from_secs(2);
        config.shutdown_timeout = Duration::from_secs(5);
        // What `auto` finds on this NATS, which syncs every message, without
        // the trial's quarter second at each start.
        config.batch_publish = kairos_server::bus::BatchPublish::Atomic;
        config
    }

    /// Runs one SQL statement with `i64` parameters against the shared
    /// database, behind the servers' backs (to stage a crash); returns the rows it changed.
    pub async fn execute_sql(&self, sql: &str, params: &[i64]) -> u64 {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.database_url)
                    .await
                    .expect("connect to sqlite");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(&mut conn).await.expect("sql").rows_affected()
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .expect("connect to postgres");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(&mut conn).await.expect("sql").rows_affected()
            }
        }
    }

    /// Takes the database's write lock from a connection of the test's own
    /// and keeps it until [`SqlWriteLock::release`]: the servers' writes wait,
    /// their reads go on.
    pub async fn hold_sql_writes(&self) -> SqlWriteLock {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.database_url)
                    .await
                    .expect("connect to sqlite");
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("write lock");
                SqlWriteLock::Sqlite(conn)
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .expect("connect to postgres");
                // SHARE conflicts with every row change and with no read.
                sqlx::raw_sql("BEGIN; LOCK TABLE tasks, task_runs IN SHARE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("write lock");
                SqlWriteLock::Postgres(conn)
            }
        }
    }

    /// Starts a replica with the default test config.
    pub async fn server(&self) -> ServerHandle {
        self.server_with(self.config()).await
    }

    /// Starts a replica with `config` and waits until it serves.
    pub async fn server_with(&self, config: ServerConfig) -> ServerHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.server_on(config, listener).await
    }

    /// Starts a replica on `listener` (e.g. the port of a stopped one).
    pub async fn server_on(&self, config: ServerConfig, listener: TcpListener) -> ServerHandle {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let token = CancellationToken::new();
        let handle = tokio::spawn(kairos_server::run(config, listener, token.clone()));
        wait_serving(&url).await;
        ServerHandle {
            url,
            token,
            handle: Some(handle),
        }
    }

    /// Starts a worker for `queue` against `server`.
    pub fn worker<H: Handler>(
        &self,
        server: &ServerHandle,
        queue: &str,
        concurrency: usize,
        handler: H,
    ) -> WorkerHandle {
        let worker = Worker::builder()
            .server(server.url.clone())
            .nats(self.nats.url())
            .queue(queue, handler)
            .concurrency(concurrency)
            .backoff(Duration::from_millis(200), Duration::from_secs(2))
            .shutdown_timeout(Duration::from_secs(5))
            .build()
            .expect("worker config");
        self.spawn_worker(worker)
    }

    /// Runs a worker built by the test.
    pub fn spawn_worker(&self, worker: Worker) -> WorkerHandle {
        let token = CancellationToken::new();
        let run = worker.run(token.clone());
        let handle = tokio::spawn(async move {
            run.await.expect("worker failed");
        });
        WorkerHandle {
            token,
            handle: Some(handle),
        }
    }

    /// Returns the JetStream state of a stream: (messages, last sequence).
    pub async fn stream_state(&self, name: &str) -> (u64, u64) {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(name).await.expect("stream");
        let info = stream.info().await.expect("stream info");
        (info.state.messages, info.state.last_sequence)
    }
}

impl Stack {
    /// Returns what JetStream says of a consumer of the ready stream now.
    pub async fn ready_consumer(&self, name: &str) -> async_nats::jetstream::consumer::Info {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("KAIROS_READY").await.expect("stream");
        stream.consumer_info(name).await.expect("consumer info")
    }

    /// Sets the largest message the ready stream takes (-1 for no limit):
    /// 1 makes JetStream refuse every release.
    pub async fn set_ready_max_message_size(&self, bytes: i32) {
        self.change_stream("KAIROS_READY", |config| config.max_message_size = bytes)
            .await;
    }

    /// Caps the tasks stream at `n` messages (-1 for no cap), refusing new
    /// ones beyond it: a batch then fails part way.
    pub async fn set_tasks_max_messages(&self, n: i64) {
        self.change_stream("KAIROS_TASKS", |config| {
            config.max_messages = n;
            config.discard = async_nats::jetstream::stream::DiscardPolicy::New;
        })
        .await;
    }

    /// Changes a stream's settings behind the servers' backs.
    async fn change_stream(
        &self,
        name: &str,
        change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
    ) {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(name).await.expect("stream");
        let mut config = stream.info().await.expect("stream info").config.clone();
        change(&mut config);
        js.update_stream(config).await.expect("update stream");
    }

    /// Waits until a worker pulls `queue`'s ahead lane (a pull waits on its consumer).
    pub async fn wait_ahead_pulled(&self, queue: &str) {
        let name = kairos_proto::wire::ahead_consumer(queue);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.ready_consumer(&name).await.num_waiting == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no worker pulls the ahead lane of {queue}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns how many task messages dispatchers hold unacknowledged in open buckets.
    pub async fn held_in_buckets(&self) -> u64 {
        use futures::TryStreamExt as _;
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("KAIROS_TASKS").await.expect("stream");
        let consumers: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .expect("consumer list");
        consumers.iter().map(|c| c.num_ack_pending as u64).sum()
    }

    /// Asks the consumer of the bucket `bucket_ms` for up to `n` task
    /// messages on a subscription of the caller's, once the dispatcher pulls
    /// it: the consumer then counts them delivered, as it would messages lost
    /// on their way to the dispatcher, and nothing acknowledges them.
    pub async fn pull_behind_dispatcher(&self, bucket_ms: i64, n: usize) -> async_nats::Subscriber {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client.clone());
        let stream = js
            .get_stream(kairos_proto::wire::TASKS_STREAM)
            .await
            .expect("stream");
        let name = kairos_proto::wire::bucket_consumer(bucket_ms);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // The dispatcher's own request comes first, so both get messages.
        loop {
            match stream.consumer_info(&name).await {
                Ok(info) if info.num_waiting > 0 => break,
                _ => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no dispatcher pulls bucket {bucket_ms}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(inbox.clone()).await.expect("subscribe");
        let request = format!("{{\"batch\":{n}}}");
        client
            .publish_with_reply(
                format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.{name}",
                    kairos_proto::wire::TASKS_STREAM
                ),
                inbox,
                request.into(),
            )
            .await
            .expect("pull request");
        client.flush().await.expect("flush");
        subscriber
    }

    /// Waits until dispatchers hold `n` task messages in memory.
    pub async fn wait_held(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let held = self.held_in_buckets().await;
            if held >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {held} of {n} held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Connects a client to a server.
pub async fn client(server: &ServerHandle) -> Client {
    Client::connect(server.url.clone()).await.expect("client")
}

/// Polls GetTask until the task reaches `state`, or panics after `timeout`.
pub async fn wait_for_state(
    client: &mut Client,
    id: &str,
    state: TaskState,
    timeout: Duration,
) -> Task {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (task, _) = client.get_task(id).await.expect("get task");
        if task.state == state {
            return task;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} is {:?}, not {state:?}, after {timeout:?}",
            task.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every task in `ids` SUCCEEDED, each within `timeout`.
pub async fn wait_all_succeeded(client: &mut Client, ids: &[String], timeout: Duration) {
    for id in ids {
        wait_for_state(client, id, TaskState::Succeeded, timeout).await;
    }
}

async fn wait_serving(url: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest {
                service: "kairos.v1.SchedulerService".into(),
            };
            if let Ok(response) = health.check(request).await
                && response.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server at {url} never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates an empty database in the test Postgres and returns its URL.
pub async fn fresh_postgres_database() -> String {
    let base = std::env::var("KAIROS_TEST_DATABASE_URL").expect(
        "KAIROS_TEST_DATABASE_URL is not set: run the tests through ./scripts/test.sh, \
         which starts a private Postgres",
    );
    let name = format!("kairos_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to test postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
    format!("{prefix}/{name}")
}
