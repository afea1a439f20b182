//! Fixtures for the integration tests: real `nats-server` and `redis-server`
//! child processes on free ports (killed and cleaned up on drop), a fresh SQLite
//! file or Postgres database per test, in-process Kairos servers and workers.
//!
//! # Layout
//! - [`procs`]: the NATS and Redis child processes.
//! - [`http`]: a small HTTP receiver for webhook tests.
//! - [`stack`]: a whole Kairos stack (database, servers, workers, client).

pub mod http;
pub mod procs;
pub mod stack;

pub use procs::{NatsServer, RedisServer};
pub use stack::{Backend, RunLog, ServerHandle, Stack, WorkerHandle};

/// A program the test script builds or installs: the path in `var`, else
/// `default` under the repository; panics with `how` to get it when missing.
pub fn program(var: &str, default: &str, how: &str) -> std::path::PathBuf {
    let path = std::env::var_os(var).map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(default)
        },
        std::path::PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/test.sh, or {how} first",
        path.display()
    );
    path
}

/// Installs a test log subscriber once (`KAIROS_TEST_LOG=debug` for more).
pub fn init_tracing() {
    let filter = std::env::var("KAIROS_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// Generates one `#[tokio::test]` per SQL backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await;
                }
            )*
        }
    };
}
