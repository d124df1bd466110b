//! The command line shared by the `cdn_purge_api` (HTTP) and `grpc_purge`
//! servers: the tenants file, Redis, the simulated backend, the shedder.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::backend::BackendConfig;
use super::config::Config;
use super::{Options, RedisOptions};

/// How to run the purge service (everything but the address).
#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// The tenants file: plans, tenants and their API keys, the admin key.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tenants.toml"))]
    tenants: PathBuf,
    /// Keep the rate limits in this Redis, shared by every instance using
    /// it (needs `--features redis`).
    #[arg(long)]
    redis: Option<String>,
    /// Without Redis: `local` (this node's limits), `open` or `closed`.
    #[arg(long, default_value = "local", requires = "redis")]
    redis_failure: String,
    /// Key prefix in Redis; instances sharing limits use the same.
    #[arg(long, default_value = "cdn-purge-api:", requires = "redis")]
    redis_prefix: String,
    /// The backend's latency per call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    backend_latency_ms: u64,
    /// Calls the backend serves at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    backend_concurrency: u64,
    /// Items the backend purges a second.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    backend_items_per_second: u32,
    /// Requests in flight in the process before load is shed.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
}

/// The result of a server's run.
pub(crate) type Served = Result<(), Box<dyn std::error::Error>>;

impl ServerArgs {
    /// Loads the tenants file, sets up logging and a tokio runtime, and runs
    /// `serve` on them. A tenants file that cannot be read or is invalid
    /// exits with 2 and the reason; a failed run with 1.
    pub(crate) fn run<F>(self, serve: impl FnOnce(Config, Options) -> F) -> ExitCode
    where
        F: Future<Output = Served>,
    {
        let config = match Config::load(&self.tenants) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::stderr)
            .init();
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let options = self.options();
        match runtime.block_on(serve(config, options)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn options(self) -> Options {
        Options {
            backend: BackendConfig {
                latency: Duration::from_millis(self.backend_latency_ms),
                // At most 100,000, checked by the parser.
                concurrency: self.backend_concurrency as usize,
                items_per_second: self.backend_items_per_second,
            },
            redis: self.redis.map(|url| RedisOptions {
                url,
                prefix: self.redis_prefix,
                on_failure: self.redis_failure,
            }),
            max_in_flight: self.max_in_flight,
            ..Options::default()
        }
    }
}
