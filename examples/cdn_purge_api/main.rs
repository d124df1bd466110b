//! A multi-tenant CDN purge API with every tower-floodgate layer wired in,
//! in front of a simulated purge backend of finite capacity.
//!
//! ```text
//! cargo run --release --example cdn_purge_api -- --addr 127.0.0.1:8080
//! cargo run --release --features redis --example cdn_purge_api -- \
//!     --addr 127.0.0.1:8081 --redis redis://127.0.0.1:6379
//! ```
//!
//! Tenants, their API keys and plans come from `examples/tenants.toml`
//! (`--tenants FILE` for another). See the README for curl commands, and
//! `app/mod.rs` for the order of the layers.

#[allow(dead_code)]
mod app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use app::backend::BackendConfig;
use app::config::Config;
use app::{Options, RedisOptions};

/// A multi-tenant CDN purge API protected by tower-floodgate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
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

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.tenants) {
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
    match runtime.block_on(serve(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args, config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let options = Options {
        backend: BackendConfig {
            latency: Duration::from_millis(args.backend_latency_ms),
            concurrency: usize::try_from(args.backend_concurrency)?,
            items_per_second: args.backend_items_per_second,
        },
        redis: args.redis.map(|url| RedisOptions {
            url,
            prefix: args.redis_prefix,
            on_failure: args.redis_failure,
        }),
        max_in_flight: args.max_in_flight,
        ..Options::default()
    };
    let app = app::build(&config, &options)?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app.router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
