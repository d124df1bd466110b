use std::convert::Infallible;
use std::hint::black_box;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::{ConcurrencyCapLayer, Plan, TenantKey};
#[path = "../benches/support/mod.rs"] mod support;
use support::now;
async fn hello(_: Request<()>) -> Result<Response<Empty<Bytes>>, Infallible> { Ok(Response::new(Empty::new())) }
fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let t = TenantKey::from("tenant-hot");
    let mk = || { let mut r = Request::new(()); r.extensions_mut().insert(t.clone()); r };
    match mode.as_str() {
        "bare" => { let mut s = service_fn(hello); for _ in 0..n { let svc = now(s.ready()).unwrap(); black_box(now(svc.call(mk())).is_ok()); } }
        "tower" => { let mut s = ServiceBuilder::new().concurrency_limit(1024).service(service_fn(hello)); for _ in 0..n { let svc = now(s.ready()).unwrap(); black_box(now(svc.call(mk())).is_ok()); } }
        _ => { let mut s = ServiceBuilder::new().layer(ConcurrencyCapLayer::new(Plan::new("p").concurrency(1024)).global_limit(1024)).service(service_fn(hello)); for _ in 0..n { let svc = now(s.ready()).unwrap(); black_box(now(svc.call(mk())).is_ok()); } }
    }
}
