//! The CDN purge API over gRPC (tonic 0.14), with the same tower-floodgate
//! layers as the HTTP `cdn_purge_api`, in front of the same simulated
//! backend. `examples/proto/purge.proto` is compiled at build time with a
//! protoc from crates.io (feature `grpc-example`): nothing to install.
//!
//! ```text
//! cargo run --release --features grpc-example --example grpc_purge -- --addr 127.0.0.1:50051
//! ```
//!
//! Call it with the API key as `authorization: Bearer KEY` metadata (see
//! `tests/grpc_purge.rs` for a tonic client, or with grpcurl:
//! `grpcurl -plaintext -import-path examples/proto -proto purge.proto -H
//! 'authorization: Bearer key_acme_5f0b2d8e61c4' -d '{"urls": {"values":
//! ["https://www.acme.test/"]}}' 127.0.0.1:50051
//! floodgate.purge.v1.PurgeService/Purge`).
//!
//! Status codes: UNAUTHENTICATED (no or unknown key), INVALID_ARGUMENT (bad
//! targets), RESOURCE_EXHAUSTED (rate limit and item rate, with
//! `grpc-retry-pushback-ms`; concurrency cap, without: there is no known
//! wait), UNAVAILABLE (shed, or the backend over capacity, with
//! `grpc-retry-pushback-ms`).

#[allow(dead_code)]
#[path = "cdn_purge_api/app/mod.rs"]
mod app;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use app::Options;
use app::cli::{Served, ServerArgs};
use app::config::Config;

/// The CDN purge API over gRPC, protected by tower-floodgate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
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
    let (state, layers) = app::service(&config, &options)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("listening on {}", listener.local_addr()?);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    app::grpc::serve(state, layers, incoming, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
