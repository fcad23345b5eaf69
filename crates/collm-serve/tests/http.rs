//! `collm serve` against a tiny trained CoLLM-MF run (tiny random backbone, synthetic data):
//! every route, every error status, cold users, batching across concurrent clients equal to
//! sequential scoring, a full queue answered 503 with Retry-After, a shutdown that lets a
//! request in flight finish; and shedding: requests over `--max-items`, stalled and idle
//! connections closed after the header timeout, work whose client has gone dropped.

use collm::experiment::Mode;
use collm::recommend::Recommender;
use collm::testing::{Family, Spec};
use collm_serve::client::{request, Reply};
use collm_serve::{start, ServeOptions};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// A tiny CoLLM-MF run (dataset, MF, step 1, step 2), trained once for every test here.
fn run() -> PathBuf {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| Family::build(Spec::default()).unwrap())
        .run(Mode::Collm)
}

fn options(run: &Path) -> ServeOptions {
    ServeOptions {
        run: run.to_path_buf(),
        data: None,
        addr: "127.0.0.1:0".into(),
        max_batch: 64,
        max_wait: Duration::from_millis(2),
        queue: 256,
        max_body: 4096,
        max_items: None,
        header_timeout: None,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn post(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str, body: &str) -> Reply {
    rt.block_on(request(addr, "POST", path, body.as_bytes()))
        .unwrap()
}

fn get(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str) -> Reply {
    rt.block_on(request(addr, "GET", path, b"")).unwrap()
}

fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(needle), "{status}: {msg:?} lacks {needle:?}");
}

/// A server over the shared run, the library's recommender over the same run, a runtime.
fn serve() -> (collm_serve::Server, Recommender, tokio::runtime::Runtime) {
    let run = run();
    let rec = Recommender::open(&run, None).unwrap();
    (start(&options(&run)).unwrap(), rec, rt())
}

#[test]
fn every_route_answers_as_the_library_scores() {
    let (server, rec, rt) = serve();
    let addr = server.addr();
    let h = get(&rt, addr, "/health");
    assert_eq!(h.status, 200);
    let health = h.json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["kind"], "collm");
    let (max_user, max_item) = (rec.max_user(), rec.max_item());
    assert_eq!(health["users"], max_user);
    assert_eq!(health["items"], max_item);

    let user = rec.user(3).unwrap();
    let items = [5u32, 1, 17, 5, 2];
    let want = rec.score(&user, &items).unwrap();
    let r = post(
        &rt,
        addr,
        "/v1/score",
        &json!({"user": 3, "items": items}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let got: Vec<f64> = serde_json::from_value(r.json()["scores"].clone()).unwrap();
    assert_eq!(got.len(), items.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{got:?} vs {want:?}");
    }
    assert!(
        (got[0] - got[3]).abs() < 1e-6,
        "the same item twice scores the same"
    );

    // Rank over given candidates: the best k, best first, titled.
    let cands = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let r = post(
        &rt,
        addr,
        "/v1/rank",
        &json!({"user": 3, "k": 3, "candidates": cands}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let ranked = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(ranked.len(), 3);
    let scores = rec.score(&user, &cands).unwrap();
    let mut best: Vec<(f64, u32)> = scores.iter().copied().zip(cands).collect();
    best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (x, (s, i)) in ranked.iter().zip(&best) {
        assert_eq!(x["item"], *i);
        assert!((x["score"].as_f64().unwrap() - s).abs() < 1e-4);
        assert_eq!(x["title"], rec.dataset.title(*i));
    }
    // Without candidates: every unseen item, none the user has interacted with.
    let r = post(
        &rt,
        addr,
        "/v1/rank",
        &json!({"user": 3, "k": 100}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let all = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(all.len(), rec.unseen(&user).len());
    assert!(all
        .iter()
        .all(|x| !user.seen.contains(&(x["item"].as_u64().unwrap() as u32))));

    // A cold user: a history instead of an id; scored as the library scores it.
    let cold = rec.cold_user(&[4, 9, 2]).unwrap();
    let want = rec.score(&cold, &[1, 3]).unwrap();
    let r = post(
        &rt,
        addr,
        "/v1/score",
        &json!({"history": [4, 9, 2], "items": [1, 3]}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let got: Vec<f64> = serde_json::from_value(r.json()["scores"].clone()).unwrap();
    assert!((got[0] - want[0]).abs() < 1e-4 && (got[1] - want[1]).abs() < 1e-4);
    let r = post(
        &rt,
        addr,
        "/v1/rank",
        &json!({"history": [], "k": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let o = get(&rt, addr, "/openapi.json");
    assert_eq!(o.status, 200);
    let paths = o.json()["paths"].clone();
    for p in ["/v1/score", "/v1/rank", "/health", "/metrics"] {
        assert!(paths.get(p).is_some(), "openapi lacks {p}");
    }
    server.stop().unwrap();
}

#[test]
fn every_bad_request_is_a_json_error_with_its_status() {
    let (server, rec, rt) = serve();
    let addr = server.addr();
    let (max_user, max_item) = (rec.max_user(), rec.max_item());
    let score = |body: &str| post(&rt, addr, "/v1/score", body);
    assert_error(&score("{\"user\": 3, \"items\": [1,"), 400, "invalid JSON");
    assert_error(&score("not json"), 400, "invalid JSON");
    assert_error(
        &score("{\"user\": 3, \"itemz\": [1]}"),
        400,
        "unknown field `itemz`",
    );
    assert_error(
        &score("{\"user\": \"3\", \"items\": [1]}"),
        400,
        "invalid type",
    );
    assert_error(&score("{\"user\": -1, \"items\": [1]}"), 400, "invalid");
    assert_error(
        &score("{\"user\": 3, \"items\": []}"),
        400,
        "'items' must hold",
    );
    assert_error(&score("{\"items\": [1]}"), 400, "missing 'user'");
    assert_error(
        &score("{\"user\": 3, \"history\": [1], \"items\": [1]}"),
        400,
        "not both",
    );
    let unknown = format!(
        "unknown user {}: user ids run from 1 to {max_user}",
        max_user + 1
    );
    assert_error(
        &score(&json!({"user": max_user + 1, "items": [1]}).to_string()),
        404,
        &unknown,
    );
    assert_error(
        &score("{\"user\": 0, \"items\": [1]}"),
        404,
        "unknown user 0",
    );
    let unknown = format!("unknown item 999999: item ids run from 1 to {max_item}");
    assert_error(
        &score("{\"user\": 3, \"items\": [1, 999999]}"),
        404,
        &unknown,
    );
    assert_error(
        &score("{\"history\": [999999], \"items\": [1]}"),
        404,
        "unknown item 999999",
    );
    assert_error(
        &post(&rt, addr, "/v1/rank", "{\"user\": 3, \"k\": 0}"),
        400,
        "'k' must be",
    );
    assert_error(
        &post(&rt, addr, "/v1/rank", "{\"user\": 3, \"candidates\": []}"),
        400,
        "'candidates' must hold",
    );
    let big = json!({"user": 3, "items": vec![1; 3000]}).to_string();
    assert!(big.len() > 4096);
    assert_error(&score(&big), 413, "over the limit of 4096 bytes");
    // Too many ids is one rule, 413, for a history as for items.
    let long_history = json!({"history": vec![1; 100_001], "items": [1]}).to_string();
    let mut wide = options(&run());
    wide.max_body = 4 << 20;
    let wide = start(&wide).unwrap();
    assert_error(
        &post(&rt, wide.addr(), "/v1/score", &long_history),
        413,
        "'history' holds 100001 item ids",
    );
    wide.stop().unwrap();
    assert_error(&get(&rt, addr, "/v2/nothing"), 404, "no route /v2/nothing");
    assert_eq!(get(&rt, addr, "/v1/score").status, 405);
    let m = get(&rt, addr, "/metrics");
    let needle = "collm_http_errors_total{route=\"/v1/score\",status=\"404\"}";
    assert!(
        m.body.contains(needle),
        "/metrics lacks {needle}:\n{}",
        m.body
    );
    server.stop().unwrap();
}

/// A `Content-Length` over `--max-body` is answered 413 at once, without waiting for a body
/// that never comes (it was a 408 after 30 s).
#[test]
fn a_declared_body_over_the_limit_is_413_at_once() {
    use std::io::{Read, Write};
    let (server, _, _) = serve();
    let t = std::time::Instant::now();
    let mut conn = std::net::TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("Content-Length"), "{reply}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    server.stop().unwrap();
}

/// Candidates named twice are ranked once.
#[test]
fn repeated_candidates_are_ranked_once() {
    let (server, _, rt) = serve();
    let r = post(
        &rt,
        server.addr(),
        "/v1/rank",
        "{\"user\": 3, \"k\": 10, \"candidates\": [5, 5, 7, 5, 7]}",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut items: Vec<u64> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"].as_u64().unwrap())
        .collect();
    items.sort_unstable();
    assert_eq!(items, [5, 7]);
    server.stop().unwrap();
}

#[test]
fn concurrent_clients_are_batched_and_equal_sequential_scoring() {
    let (server, rec, rt) = serve();
    let addr = server.addr();
    let (max_user, max_item) = (rec.max_user(), rec.max_item());
    let jobs: Vec<(u64, Vec<u32>)> = (0..48)
        .map(|n| {
            let u = 1 + (n * 7) % u64::from(max_user);
            let items = (0..6)
                .map(|j| 1 + ((n * 13 + j * 5) % u64::from(max_item)) as u32)
                .collect();
            (u, items)
        })
        .collect();
    let replies: Vec<Reply> = rt.block_on(async {
        let tasks: Vec<_> = jobs
            .iter()
            .map(|(u, items)| {
                let body = json!({"user": u, "items": items}).to_string();
                tokio::spawn(
                    async move { request(addr, "POST", "/v1/score", body.as_bytes()).await },
                )
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    for ((u, items), r) in jobs.iter().zip(&replies) {
        assert_eq!(r.status, 200, "{}", r.body);
        let got: Vec<f64> = serde_json::from_value(r.json()["scores"].clone()).unwrap();
        let want = rec.score(&rec.user(*u).unwrap(), items).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "user {u}: {got:?} vs {want:?}");
        }
    }
    let m = get(&rt, addr, "/metrics");
    assert_eq!(m.status, 200);
    for needle in [
        "collm_http_requests_total{route=\"/v1/score\",status=\"200\"}",
        "collm_http_request_duration_seconds_bucket",
        "collm_batch_rows_bucket",
        "collm_queue_depth",
    ] {
        assert!(
            m.body.contains(needle),
            "/metrics lacks {needle}:\n{}",
            m.body
        );
    }
    // Some model calls took several requests at once.
    let batched = m
        .body
        .lines()
        .find(|l| l.starts_with("collm_batch_requests_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|x| x.parse::<f64>().ok())
        .unwrap();
    let requests_scored = 48.0;
    assert!(
        batched < requests_scored,
        "{batched} model calls for {requests_scored} requests"
    );
    server.stop().unwrap();
}

#[test]
fn shutdown_lets_a_request_in_flight_finish() {
    let (server, _, rt) = serve();
    let addr = server.addr();
    let slow = json!({"user": 5, "k": 5}).to_string();
    let inflight =
        rt.spawn(async move { request(addr, "POST", "/v1/rank", slow.as_bytes()).await });
    std::thread::sleep(Duration::from_millis(30));
    server.stop().unwrap();
    let r = rt.block_on(inflight).unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        rt.block_on(request(addr, "GET", "/health", b"")).is_err(),
        "stopped"
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_recovers() {
    let run = run();
    let rt = rt();
    let server = start(&ServeOptions {
        queue: 1,
        max_batch: 1,
        ..options(&run)
    })
    .unwrap();
    let addr = server.addr();
    let items: Vec<u32> = (1..=40).collect();
    let body = json!({"user": 2, "items": items}).to_string();
    let replies: Vec<Reply> = rt.block_on(async {
        let tasks: Vec<_> = (0..150)
            .map(|_| {
                let b = body.clone();
                tokio::spawn(async move { request(addr, "POST", "/v1/score", b.as_bytes()).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), replies.len(), "only 200 and 503");
    assert!(ok >= 1 && !busy.is_empty(), "{ok} ok, {} busy", busy.len());
    for r in &busy {
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        assert_error(r, 503, "queue is full");
    }
    // Healthy afterwards.
    let r = post(&rt, addr, "/v1/score", &body);
    assert_eq!(r.status, 200);
    server.stop().unwrap();
}

/// GET /metrics's value of `name` (a counter's `_total` line), 0 when absent.
fn metric(rt: &tokio::runtime::Runtime, addr: SocketAddr, name: &str) -> f64 {
    get(rt, addr, "/metrics")
        .body
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_wrong_method_is_a_json_405_counted_in_metrics() {
    let run = run();
    let rt = rt();
    let server = start(&options(&run)).unwrap();
    let addr = server.addr();
    let r = get(&rt, addr, "/v1/score");
    assert_error(&r, 405, "takes POST");
    let counted = get(&rt, addr, "/metrics")
        .body
        .lines()
        .any(|l| l.starts_with("collm_http_requests_total") && l.contains("status=\"405\""));
    assert!(counted, "405 not in /metrics");
    server.stop().unwrap();
}

#[test]
fn an_llm_run_takes_at_most_max_items_per_request() {
    let run = run();
    let rt = rt();
    let server = start(&ServeOptions {
        max_body: 1 << 20,
        ..options(&run)
    })
    .unwrap();
    let addr = server.addr();
    // 1,001 ids (repeats allowed): one over a CoLLM run's default.
    let items: Vec<u32> = (0..1001).map(|k| 1 + k % 30).collect();
    let r = post(
        &rt,
        addr,
        "/v1/score",
        &json!({"user": 2, "items": items}).to_string(),
    );
    assert_error(&r, 413, "--max-items");
    let r = post(
        &rt,
        addr,
        "/v1/rank",
        &json!({"user": 2, "candidates": items}).to_string(),
    );
    assert_error(&r, 413, "--max-items");
    let r = post(
        &rt,
        addr,
        "/v1/score",
        &json!({"user": 2, "items": &items[..1000]}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop().unwrap();
}

#[test]
fn a_stalled_request_is_closed_and_holds_neither_health_nor_shutdown() {
    use std::io::{Read, Write};
    let run = run();
    let rt = rt();
    let server = start(&ServeOptions {
        header_timeout: Some(Duration::from_secs(1)),
        ..options(&run)
    })
    .unwrap();
    let addr = server.addr();
    // Headers without their final blank line: closed after the timeout.
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    stalled
        .write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n")
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert!(t.elapsed() < Duration::from_secs(15), "not closed");
    let _ = n; // hyper may say 408 before it closes
               // 200 idle sockets: /health still answers, and they are closed in time too.
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    assert_eq!(get(&rt, addr, "/health").status, 200);
    // A shutdown with a stalled connection open ends once it is closed, not when the client
    // gives up.
    let mut again = std::net::TcpStream::connect(addr).unwrap();
    again.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let t = std::time::Instant::now();
    server.stop().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "shutdown waited {:?}",
        t.elapsed()
    );
    drop((idle, again));
}

#[test]
fn work_whose_client_has_gone_is_dropped() {
    use std::io::Write;
    let run = run();
    let rt = rt();
    let server = start(&ServeOptions {
        max_batch: 1,
        max_body: 1 << 20,
        ..options(&run)
    })
    .unwrap();
    let addr = server.addr();
    let items: Vec<u32> = (0..1000).map(|k| 1 + k % 30).collect();
    let body = json!({"user": 2, "items": items}).to_string();
    // A long request that keeps the worker busy, then clients that send theirs and leave.
    let busy = {
        let body = body.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(request(addr, "POST", "/v1/score", body.as_bytes()))
                .unwrap()
                .status
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(s);
    }
    assert_eq!(busy.join().unwrap(), 200);
    let t = std::time::Instant::now();
    while metric(&rt, addr, "collm_abandoned_requests_total") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "nothing was dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The worker is free again: a small request is answered.
    let r = post(
        &rt,
        addr,
        "/v1/score",
        &json!({"user": 2, "items": [1]}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop().unwrap();
}
