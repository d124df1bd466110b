//! The incident, replayed: one tenant floods a multi-tenant purge API, and
//! what every other tenant sees without and with tower-floodgate.
//!
//! ```text
//! cargo run --release --example rogue_tenant [-- --seconds 10] [--json]
//! ```
//!
//! Starts the `cdn_purge_api` example's server in-process three times, each
//! in front of the same kind of simulated purge backend (20 ms a call, 8
//! calls at once, 2,000 items a second; over that it answers 429):
//!
//! * **baseline**: twenty tenants send a steady, modest mix of purges (5 a
//!   second each, 1 to 4 targets), nobody floods;
//! * **unprotected**: the same, while one tenant sends purges as fast as 16
//!   connections allow, mostly the same few URLs, as in the incident; the
//!   layers are in shadow mode (they only count) and every request calls the
//!   backend itself, as before the incident;
//! * **protected**: the same flood, the layers enforcing.
//!
//! It prints a table per phase and, with `--json`, one JSON object on the
//! last line.

#[allow(dead_code)]
#[path = "cdn_purge_api/app/mod.rs"]
mod app;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde_json::{Value, json};

use app::config::Config;
use app::{Options, backend::BackendConfig};

/// Replays the incident: one tenant floods a purge API.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// How long each phase runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Connections the rogue tenant floods from.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    rogue_connections: u64,
    /// Print one JSON object with every phase's figures on the last line.
    #[arg(long)]
    json: bool,
}

const GOOD_TENANTS: usize = 20;
const ROGUE: &str = "rogue";
type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The tenants file of the replay: everybody on the same plan.
fn config() -> Config {
    let mut text = String::from(
        r#"admin_key = "adm_replay_0123456789"

[plans.standard]
requests_per_second = 20
burst = 40
items_per_second = 500
items_burst = 1000
concurrency = 8
priority = "normal"
"#,
    );
    for i in 0..GOOD_TENANTS {
        text.push_str(&format!(
            "\n[[tenants]]\nid = \"tenant-{i:02}\"\nkey = \"key_tenant_{i:02}\"\nplan = \"standard\"\n"
        ));
    }
    text.push_str(&format!(
        "\n[[tenants]]\nid = \"{ROGUE}\"\nkey = \"key_{ROGUE}\"\nplan = \"standard\"\n"
    ));
    match Config::parse(&text) {
        Ok(config) => config,
        Err(e) => unreachable!("the replay's tenants file is valid: {e}"),
    }
}

/// What one phase measured.
#[derive(Debug, Default)]
struct Phase {
    good_sent: u64,
    good_ok: u64,
    good_latencies_us: Vec<u64>,
    rogue_admitted: u64,
    rogue_rejected: u64,
    backend_calls: u64,
    backend_items: u64,
    purge_requests: u64,
    coalesced: u64,
    top_tenant: String,
    top_share: f64,
}

impl Phase {
    fn success_rate(&self) -> f64 {
        if self.good_sent == 0 {
            return 0.0;
        }
        self.good_ok as f64 / self.good_sent as f64
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.good_latencies_us.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    }

    fn json(&self) -> Value {
        json!({
            "good_requests": self.good_sent,
            "good_success_rate": round(self.success_rate(), 4),
            "good_p50_ms": round(self.percentile_ms(0.50), 1),
            "good_p99_ms": round(self.percentile_ms(0.99), 1),
            "rogue_admitted": self.rogue_admitted,
            "rogue_rejected": self.rogue_rejected,
            "backend_calls": self.backend_calls,
            "backend_items": self.backend_items,
            "coalesced": self.coalesced,
            "top_tenant": self.top_tenant,
            "top_tenant_share": round(self.top_share, 3),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let run_for = Duration::from_secs(args.seconds);
    let phases = [
        ("baseline", false, true),
        ("unprotected", true, false),
        ("protected", true, true),
    ];
    let mut results = Vec::new();
    for (name, rogue, protected) in phases {
        eprintln!("{name}: {} s ...", args.seconds);
        let phase = phase(run_for, rogue, protected, args.rogue_connections).await?;
        print_phase(name, &phase, run_for);
        results.push((name, phase));
    }
    let baseline_p99 = results[0].1.percentile_ms(0.99);
    let protected = &results[2].1;
    println!(
        "\nprotected vs baseline: success {:.2}% (baseline {:.2}%), p99 {:.1} ms = {:.2}x baseline's {:.1} ms",
        protected.success_rate() * 100.0,
        results[0].1.success_rate() * 100.0,
        protected.percentile_ms(0.99),
        protected.percentile_ms(0.99) / baseline_p99.max(0.001),
        baseline_p99,
    );
    if args.json {
        let mut all = serde_json::Map::new();
        for (name, phase) in &results {
            all.insert((*name).to_owned(), phase.json());
        }
        println!("{}", Value::Object(all));
    }
    Ok(())
}

fn print_phase(name: &str, phase: &Phase, run_for: Duration) {
    let secs = run_for.as_secs_f64();
    println!("\n== {name} ({secs:.0} s)");
    println!(
        "  normal tenants  {:>7} requests   success {:>7.2}%   p50 {:>6.1} ms   p99 {:>6.1} ms",
        phase.good_sent,
        phase.success_rate() * 100.0,
        phase.percentile_ms(0.50),
        phase.percentile_ms(0.99),
    );
    println!(
        "  rogue tenant    {:>7} admitted   {:>7} refused",
        phase.rogue_admitted, phase.rogue_rejected
    );
    println!(
        "  backend         {:>7} calls      {:>7} items purged   coalesced {} of {} purges",
        phase.backend_calls, phase.backend_items, phase.coalesced, phase.purge_requests
    );
    println!(
        "  top tenant      {} ({:.1}% of requests)",
        phase.top_tenant,
        phase.top_share * 100.0
    );
}

/// Runs one phase on a fresh server.
async fn phase(
    run_for: Duration,
    rogue: bool,
    protected: bool,
    rogue_connections: u64,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let config = config();
    let app = app::build(
        &config,
        &Options {
            backend: BackendConfig::default(),
            protected,
            log: false,
            ..Options::default()
        },
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app.router).await });
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build_http();

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let (good_sent, good_ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (rogue_ok, rogue_refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let mut tasks = Vec::new();
    for i in 0..GOOD_TENANTS {
        let client = client.clone();
        let (latencies, sent, ok) = (
            Arc::clone(&latencies),
            Arc::clone(&good_sent),
            Arc::clone(&good_ok),
        );
        tasks.push(tokio::spawn(async move {
            // 5 requests a second, staggered across tenants.
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut n = 0u64;
            while start.elapsed() < run_for {
                tick.tick().await;
                let body = good_body(i, n);
                n += 1;
                let began = Instant::now();
                let fine = purge(&client, addr, &format!("key_tenant_{i:02}"), body)
                    .await
                    .is_ok_and(|(status, body)| status == StatusCode::OK && all_purged(&body));
                latencies
                    .lock()
                    .push(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
                sent.fetch_add(1, Ordering::Relaxed);
                ok.fetch_add(u64::from(fine), Ordering::Relaxed);
            }
        }));
    }
    if rogue {
        for c in 0..rogue_connections {
            let client = client.clone();
            let (stop, ok, refused) = (
                Arc::clone(&stop),
                Arc::clone(&rogue_ok),
                Arc::clone(&rogue_refused),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = c;
                while !stop.load(Ordering::Relaxed) && start.elapsed() < run_for {
                    let reply = purge(&client, addr, &format!("key_{ROGUE}"), rogue_body(n)).await;
                    n = n.wrapping_add(rogue_connections);
                    match reply {
                        Ok((StatusCode::OK, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    for task in tasks {
        task.await?;
    }
    stop.store(true, Ordering::Relaxed);

    let stats = match purge_stats(&client, addr).await {
        Ok(stats) => stats,
        Err(e) => return Err(format!("GET /v1/stats: {e}").into()),
    };
    server.abort();
    let latencies = std::mem::take(&mut *latencies.lock());
    let top = &stats["top_tenants"]["by_requests"][0];
    Ok(Phase {
        good_sent: good_sent.load(Ordering::Relaxed),
        good_ok: good_ok.load(Ordering::Relaxed),
        good_latencies_us: latencies,
        rogue_admitted: rogue_ok.load(Ordering::Relaxed),
        rogue_rejected: rogue_refused.load(Ordering::Relaxed),
        backend_calls: stats["backend"]["calls"].as_u64().unwrap_or(0),
        backend_items: stats["backend"]["items_purged"].as_u64().unwrap_or(0),
        purge_requests: stats["batcher"]["requests"].as_u64().unwrap_or(0),
        coalesced: stats["batcher"]["coalesced"].as_u64().unwrap_or(0),
        top_tenant: top["tenant"].as_str().unwrap_or("-").to_owned(),
        top_share: top["share"].as_f64().unwrap_or(0.0),
    })
}

/// A normal tenant's purge: 1 to 4 of its own URLs or a tag.
fn good_body(tenant: usize, n: u64) -> Value {
    let count = 1 + (n % 4) as usize;
    if n % 5 == 4 {
        return json!({ "tags": [format!("tenant-{tenant}-product-{}", n % 50)] });
    }
    let urls: Vec<String> = (0..count)
        .map(|k| {
            format!(
                "https://t{tenant}.cdn.example.com/assets/{}-{k}.js",
                n % 200
            )
        })
        .collect();
    json!({ "urls": urls })
}

/// The rogue's purge: nine times in ten one of five hot URLs, else a new
/// one.
fn rogue_body(n: u64) -> Value {
    let url = if n % 10 == 9 {
        format!("https://rogue.cdn.example.com/cache-bust/{n}.html")
    } else {
        format!("https://rogue.cdn.example.com/index-{}.html", n % 5)
    };
    json!({ "urls": [url] })
}

fn all_purged(body: &Value) -> bool {
    body["results"]
        .as_array()
        .is_some_and(|r| !r.is_empty() && r.iter().all(|i| i["status"] == "purged"))
}

async fn purge(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
    body: Value,
) -> Result<(StatusCode, Value), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::post(format!("http://{addr}/v1/purge"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = client.request(req).await?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    if status == StatusCode::OK {
        Ok((status, serde_json::from_slice(&bytes)?))
    } else {
        Ok((status, Value::Null))
    }
}

async fn purge_stats(
    client: &HttpClient,
    addr: SocketAddr,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::get(format!("http://{addr}/v1/stats"))
        .header("authorization", "Bearer adm_replay_0123456789")
        .body(Full::new(Bytes::new()))?;
    let res = client.request(req).await?;
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}
