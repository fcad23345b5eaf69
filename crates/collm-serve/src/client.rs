//! A small HTTP/1.1 client on hyper's connection API: one request at a time
//! ([`request`], for tests) and the load generator behind `scripts/load_test.sh`
//! ([`load_test`]: N requests from C concurrent keep-alive connections, latency percentiles
//! and the count of each status).

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// An answer: status, content type, body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn send(
    s: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Reply> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))?;
    s.ready().await?;
    let res = s.send_request(req).await?;
    let status = res.status().as_u16();
    let header = |h: hyper::header::HeaderName| {
        res.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let content_type = header(hyper::header::CONTENT_TYPE).unwrap_or_default();
    let retry_after = header(hyper::header::RETRY_AFTER);
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        content_type,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<Reply> {
    let mut s = connect(addr).await?;
    send(&mut s, addr, method, path, body).await
}

/// What a load test measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Count of each HTTP status; "error" counts requests that got no answer.
    pub statuses: BTreeMap<String, usize>,
}

/// Sends `requests` POSTs from `concurrency` keep-alive connections, cycling through
/// `bodies` (path, JSON body).
pub async fn load_test(
    addr: SocketAddr,
    requests: usize,
    concurrency: usize,
    bodies: Arc<Vec<(String, String)>>,
) -> Result<LoadReport> {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, bodies) = (next.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= requests {
                    break;
                }
                let (path, body) = &bodies[n % bodies.len()];
                let t = Instant::now();
                if conn.is_none() {
                    conn = connect(addr).await.ok();
                }
                let got = match conn.as_mut() {
                    Some(c) => send(c, addr, "POST", path, body.as_bytes()).await.ok(),
                    None => None,
                };
                let key = match &got {
                    Some(r) => r.status.to_string(),
                    None => {
                        conn = None;
                        "error".to_string()
                    }
                };
                *statuses.entry(key).or_default() += 1;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            (lat, statuses)
        }));
    }
    let mut lat = Vec::with_capacity(requests);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (l, s) = t.await?;
        lat.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(LoadReport {
        requests,
        concurrency,
        seconds,
        requests_per_s: requests as f64 / seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        statuses,
    })
}

/// `collm bench serve`: asks the server at `addr` for its id ranges (`GET /health`), then sends
/// `requests` seeded random requests from `concurrency` connections: three in four
/// `POST /v1/score` (a known user, 10 items), one in four `POST /v1/rank` (20 candidates,
/// k = 10).
pub fn run_load(addr: &str, requests: usize, concurrency: usize, seed: u64) -> Result<LoadReport> {
    use rand::{Rng, SeedableRng};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr: SocketAddr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .with_context(|| format!("{addr}: no address"))?;
        let h = request(addr, "GET", "/health", b"").await?;
        let health = h.json();
        let users = health["users"]
            .as_u64()
            .context("GET /health: no 'users'")?;
        let items = health["items"]
            .as_u64()
            .context("GET /health: no 'items'")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let bodies: Vec<(String, String)> = (0..1000)
            .map(|n| {
                let user = rng.gen_range(1..=users);
                let mut pick =
                    |k: usize| -> Vec<u64> { (0..k).map(|_| rng.gen_range(1..=items)).collect() };
                if n % 4 == 3 {
                    let c = pick(20);
                    (
                        "/v1/rank".to_string(),
                        serde_json::json!({"user": user, "k": 10, "candidates": c}).to_string(),
                    )
                } else {
                    let i = pick(10);
                    (
                        "/v1/score".to_string(),
                        serde_json::json!({"user": user, "items": i}).to_string(),
                    )
                }
            })
            .collect();
        load_test(addr, requests, concurrency, Arc::new(bodies)).await
    })
}
