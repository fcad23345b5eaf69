//! `collm serve`: a trained run behind HTTP. axum + tokio answer requests; one model worker
//! thread ([`worker`]) owns the run and scores requests in batches, sharing each user's prompt
//! prefix; a bounded queue between them turns overload into 503s instead of growing memory.
//!
//! Routes ([`api`]): `POST /v1/score`, `POST /v1/rank`, `GET /health`, `GET /metrics`
//! (Prometheus), `GET /openapi.json`. SIGTERM, SIGHUP or ctrl-c stops accepting connections, lets
//! requests in flight finish, and returns. [`client`] is the load generator behind
//! `scripts/load_test.sh`.

pub mod api;
pub mod client;
pub mod conns;
pub mod metrics;
pub mod worker;

use anyhow::{Context, Result};
use axum::routing::{get, post};
use axum::Router;
use collm::recommend::Recommender;
use metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub run: PathBuf,
    pub data: Option<PathBuf>,
    /// `host:port`; port 0 picks a free one (see [`Server::addr`]).
    pub addr: String,
    /// Most scoring rows per model call.
    pub max_batch: usize,
    /// How long the worker waits to fill a batch.
    pub max_wait: Duration,
    /// Requests waiting for the worker at most.
    pub queue: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Most items (or candidates) one request may ask to score; None: 1,000 for a CoLLM run
    /// (about a minute of an LLM on 2 cores), 100,000 for a collaborative-model run.
    pub max_items: Option<usize>,
    /// How long a connection may take to send a request's headers; None: [`HEADER_TIMEOUT`].
    pub header_timeout: Option<Duration>,
}

/// How long a connection may take to send a request's headers, idle keep-alive connections
/// included: a client that stops mid-request (or holds a socket open) is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After SIGTERM, how long the server waits for requests in flight before it exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct AppState {
    queue: worker::Queue,
    metrics: Arc<Metrics>,
    max_body: usize,
    max_items: usize,
    health: api::Health,
}

/// The routes over a state.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/score", post(api::score))
        .route("/v1/rank", post(api::rank))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(api::openapi))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        // Bodies are read with the server's own limit (413 as JSON), not axum's default.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// A running server: its address, and a way to stop it as SIGTERM would.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drains requests in flight, stops the worker; returns how the server
    /// ended.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join()
    }

    /// Waits for the server to end (SIGTERM, SIGHUP, ctrl-c or [`Server::stop`]).
    pub fn join(mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

/// Opens the run (in the worker thread), binds the address and starts serving in the
/// background. Fails before serving when the run cannot be opened or the address bound.
pub fn start(o: &ServeOptions) -> Result<Server> {
    let metrics = Arc::new(Metrics::new());
    let (run, data) = (o.run.clone(), o.data.clone());
    let (health_tx, health_rx) = std::sync::mpsc::channel();
    let (queue, worker) = worker::start(
        move || {
            let rec = Recommender::open(&run, data.as_deref())?;
            let _ = health_tx.send(api::Health {
                status: "ok".into(),
                kind: format!("{:?}", rec.kind).to_lowercase(),
                users: rec.max_user() as usize,
                items: rec.max_item() as usize,
            });
            Ok(rec)
        },
        o.queue,
        worker::Limits {
            max_batch: o.max_batch.max(1),
            max_wait: o.max_wait,
        },
        metrics.clone(),
    )?;
    let health = health_rx.recv().context("the model worker did not start")?;
    let max_items = o.max_items.unwrap_or(if health.kind == "collm" {
        1_000
    } else {
        api::MAX_ITEMS
    });
    let state = AppState {
        queue,
        metrics,
        max_body: o.max_body,
        max_items: max_items.min(api::MAX_ITEMS),
        health,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&o.addr))
        .with_context(|| format!("cannot listen on {}", o.addr))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let header_timeout = o.header_timeout;
    let thread = std::thread::Builder::new()
        .name("collm-http".into())
        .spawn(move || -> Result<()> {
            let header_timeout = header_timeout.unwrap_or(HEADER_TIMEOUT);
            rt.block_on(serve(listener, router(state), header_timeout, stop_rx));
            // Connections still open after the drain are cancelled with their tasks, and with
            // them the last senders of the queue.
            rt.shutdown_timeout(Duration::from_secs(1));
            // The router (and with it every sender of the queue) is gone: the worker finishes
            // what it holds and ends.
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("the model worker panicked"))?;
            Ok(())
        })?;
    Ok(Server {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Accepts connections until the stop signal, each with a header timeout, then drains them
/// for at most [`DRAIN_TIMEOUT`]. Open connections stay below the file-descriptor limit with a
/// reserve ([`conns`]: the oldest idle one is closed to make room). An accept error (out of
/// file descriptors all the same) is waited out, not fatal.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let conns = conns::Conns::new(conns::limit_from_rlimit());
    tracing::debug!("at most {} connections open", conns.limit());
    let mut stop = std::pin::pin!(shutdown_signal(stop));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(slot) = conns.admit() else {
                    tracing::warn!(
                        "{} connections open, every one with a request in flight: closing a new one",
                        conns.limit()
                    );
                    drop(stream);
                    continue;
                };
                let (app, registry, id) = (app.clone(), conns.clone(), slot.id());
                let service = hyper::service::service_fn(move |req| {
                    let busy = registry.busy(id);
                    let app = app.clone();
                    async move {
                        let r = app.oneshot(req).await;
                        drop(busy);
                        r
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                let task = tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = conn.await {
                        tracing::debug!("connection: {e}");
                    }
                });
                conns.attach_id(id, task.abort_handle());
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("requests still open after {} s: exiting", DRAIN_TIMEOUT.as_secs());
        }
    }
}

async fn shutdown_signal(stop: tokio::sync::oneshot::Receiver<()>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // SIGTERM and SIGHUP (a closed terminal or session) drain alike.
    #[cfg(unix)]
    let signal = |kind: tokio::signal::unix::SignalKind| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(unix)]
    let (term, hup) = (
        signal(tokio::signal::unix::SignalKind::terminate()),
        signal(tokio::signal::unix::SignalKind::hangup()),
    );
    #[cfg(not(unix))]
    let (term, hup) = (std::future::pending::<()>(), std::future::pending::<()>());
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
        _ = hup => {}
        _ = stop => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

/// `collm serve`: serves until SIGTERM, SIGHUP or ctrl-c, then drains and returns.
pub fn run(o: &ServeOptions) -> Result<()> {
    let server = start(o)?;
    tracing::info!(
        "serving {} on http://{} (POST /v1/score, POST /v1/rank, GET /health, GET /metrics, GET /openapi.json)",
        o.run.display(),
        server.addr()
    );
    eprintln!("listening on http://{}", server.addr());
    server.join()
}
