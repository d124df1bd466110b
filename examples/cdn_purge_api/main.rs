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
//! `app/mod.rs` for the order of the layers. `grpc_purge` serves the same
//! API over gRPC.

#[allow(dead_code)]
mod app;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use app::Options;
use app::cli::{Served, ServerArgs};
use app::config::Config;

/// A multi-tenant CDN purge API protected by tower-floodgate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[command(flatten)]
    server: ServerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let addr = args.addr;
    args.server
        .run(move |config, options| serve(addr, config, options))
}

async fn serve(addr: SocketAddr, config: Config, options: Options) -> Served {
    let app = app::build(&config, &options)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app.router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
