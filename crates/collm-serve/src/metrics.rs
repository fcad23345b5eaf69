//! What `GET /metrics` reports, in Prometheus text format (the `prometheus-client` crate):
//! requests and errors by route and status, request latency, rows per model batch, the
//! queue's depth, and requests dropped because their client had gone.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub errors: Family<RouteStatus, Counter>,
    pub latency: Family<Route, Histogram>,
    pub batch_rows: Histogram,
    pub batch_requests: Histogram,
    pub queue_depth: Gauge,
    /// Requests the worker dropped because their client had gone (before or while scoring).
    pub abandoned: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("collm");
        let requests = Family::<RouteStatus, Counter>::default();
        let errors = Family::<RouteStatus, Counter>::default();
        let latency = Family::<Route, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 18))
        });
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let queue_depth = Gauge::default();
        let abandoned = Counter::default();
        registry.register(
            "abandoned_requests",
            "Requests dropped by the model worker because their client disconnected",
            abandoned.clone(),
        );
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_errors",
            "HTTP requests answered with a status >= 400",
            errors.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            latency.clone(),
        );
        registry.register(
            "batch_rows",
            "Scoring rows per model call (requests batched together)",
            batch_rows.clone(),
        );
        registry.register(
            "batch_requests",
            "Requests per model call",
            batch_requests.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for the model worker",
            queue_depth.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            latency,
            batch_rows,
            batch_requests,
            queue_depth,
            abandoned,
        }
    }

    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let rs = RouteStatus {
            route: route.to_string(),
            status,
        };
        self.requests.get_or_create(&rs).inc();
        if status >= 400 {
            self.errors.get_or_create(&rs).inc();
        }
        self.latency
            .get_or_create(&Route {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
