//! The HTTP API: JSON in, JSON out, errors as `{"error": "..."}` with a 4xx status for
//! anything the client can fix. Routes are documented in `GET /openapi.json` (utoipa).

use crate::worker::{Job, Reply, Task, Who, WorkerError};
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use collm::recommend::RequestError;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use utoipa::{OpenApi, ToSchema};

/// Most items (or candidates) one request may name.
pub const MAX_ITEMS: usize = 100_000;
/// Largest `k`.
pub const MAX_K: usize = 10_000;
/// How long a request body may take to arrive (408 after it).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: m.into(),
        }
    }
    pub fn internal(m: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: m,
        }
    }
}

/// 4xx for what the request got wrong, 500 for a model failure.
impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Request(r) => r.into(),
            WorkerError::Scoring(_) => Self::internal(e.to_string()),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        Self {
            status: if e.is_not_found() {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            },
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// `POST /v1/score`: give `user` (a known id) or `history` (a cold user's liked items, oldest
/// first), not both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub user: Option<u64>,
    pub history: Option<Vec<u64>>,
    /// Items to score, in the order the scores come back.
    pub items: Vec<u64>,
}

/// Click scores: P(Yes) logits (CoLLM) or the collaborative model's logits, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScoreResponse {
    pub scores: Vec<f64>,
}

/// `POST /v1/rank`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    pub user: Option<u64>,
    pub history: Option<Vec<u64>>,
    /// How many items to return (default 10).
    pub k: Option<usize>,
    /// Items to rank (an item named twice is ranked once); absent: every item the user has not
    /// interacted with.
    pub candidates: Option<Vec<u64>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RankedItem {
    pub item: u32,
    pub score: f64,
    pub title: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RankResponse {
    pub items: Vec<RankedItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// `collm` or `cf`.
    pub kind: String,
    pub users: usize,
    pub items: usize,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "collm serve",
        description = "Scores and top-K recommendations from a trained CoLLM (or collaborative-model) run. Errors are {\"error\": \"...\"}: 400 malformed JSON or fields, 404 unknown user or item id, 405 wrong method, 408 body too slow, 413 body too large (its Content-Length at once) or too many ids ('items' and 'candidates' over --max-items, 'history' over 100,000), 503 queue full (Retry-After)."
    ),
    paths(score, rank, health, metrics),
    components(schemas(
        ScoreRequest,
        ScoreResponse,
        RankRequest,
        RankResponse,
        RankedItem,
        Health,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// Reads a JSON body of at most `limit` bytes: 413 above it (at once when the request's
/// `Content-Length` says so, before any of the body is waited for), 400 for anything malformed.
async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "request body of {n} bytes (Content-Length) over the limit of {limit} bytes"
            ),
        });
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit));
    let bytes = read
        .await
        .map_err(|_| ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        })?
        .map_err(|e| {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_big {
                ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("request body over the limit of {limit} bytes"),
                }
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// More rows in one request than the server takes (`--max-items`): 413.
fn too_many(field: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "'{field}' holds {n} item ids, this server scores at most {max} per request (collm serve --max-items)"
            ),
        });
    }
    Ok(())
}

fn who(user: Option<u64>, history: Option<Vec<u64>>) -> Result<Who, ApiError> {
    match (user, history) {
        (Some(u), None) => Ok(Who::User(u)),
        (None, Some(h)) => {
            // The one rule for too many ids in a request: 413 (as 'items' and 'candidates').
            if h.len() > MAX_ITEMS {
                return Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("'history' holds {} item ids, at most {MAX_ITEMS}", h.len()),
                });
            }
            Ok(Who::History(h))
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give 'user' (a known id) or 'history' (a new user's liked items), not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "missing 'user' (a known id) or 'history' (a new user's liked items)",
        )),
    }
}

/// Queues a job (its task made with the reply channel) and awaits its typed answer.
async fn submit<T>(
    state: &AppState,
    who: Who,
    task: impl FnOnce(Reply<T>) -> Task,
) -> Result<T, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        who,
        task: task(tx),
    };
    if state.queue.offer(job).is_err() {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model queue is full; retry shortly".into(),
        });
    }
    rx.await
        .map_err(|_| ApiError::internal("the model worker stopped".into()))?
        .map_err(ApiError::from)
}

fn timed(state: &AppState, route: &str, start: Instant, r: Response) -> Response {
    state
        .metrics
        .observe(route, r.status().as_u16(), start.elapsed().as_secs_f64());
    r
}

#[utoipa::path(post, path = "/v1/score", request_body = ScoreRequest,
    responses((status = 200, body = ScoreResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn score(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let start = Instant::now();
    let r = async {
        let req: ScoreRequest = read_json(&headers, body, state.max_body).await?;
        if req.items.is_empty() {
            return Err(ApiError::bad_request(
                "'items' must hold at least 1 item id",
            ));
        }
        too_many("items", req.items.len(), state.max_items)?;
        let who = who(req.user, req.history)?;
        let items = req.items;
        let scores = submit(&state, who, |reply| Task::Score { items, reply }).await?;
        Ok(axum::Json(ScoreResponse { scores }))
    }
    .await;
    timed(&state, "/v1/score", start, r.into_response())
}

#[utoipa::path(post, path = "/v1/rank", request_body = RankRequest,
    responses((status = 200, body = RankResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn rank(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let start = Instant::now();
    let r = async {
        let req: RankRequest = read_json(&headers, body, state.max_body).await?;
        let k = req.k.unwrap_or(10);
        if k == 0 || k > MAX_K {
            return Err(ApiError::bad_request(format!(
                "'k' must be 1 to {MAX_K}, it is {k}"
            )));
        }
        if let Some(c) = &req.candidates {
            if c.is_empty() {
                return Err(ApiError::bad_request(
                    "'candidates' must hold at least 1 item id",
                ));
            }
            too_many("candidates", c.len(), state.max_items)?;
        }
        let who = who(req.user, req.history)?;
        // An item named twice is ranked once (at its first mention's place among equals).
        let candidates = req.candidates.map(|c| {
            let mut seen = std::collections::HashSet::new();
            c.into_iter()
                .filter(|i| seen.insert(*i))
                .collect::<Vec<_>>()
        });
        let items = submit(&state, who, |reply| Task::Rank {
            k,
            candidates,
            reply,
        })
        .await?;
        Ok(axum::Json(RankResponse {
            items: items
                .into_iter()
                .map(|r| RankedItem {
                    item: r.item,
                    score: r.score,
                    title: r.title,
                })
                .collect(),
        }))
    }
    .await;
    timed(&state, "/v1/rank", start, r.into_response())
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let start = Instant::now();
    let r = axum::Json(state.health.clone()).into_response();
    timed(&state, "/health", start, r)
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn openapi() -> Response {
    axum::Json(ApiDoc::openapi()).into_response()
}

/// A known route with another method: 405 with a JSON body naming the route's method, counted
/// in `/metrics` like every answer.
pub async fn method_not_allowed(
    State(state): State<AppState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let start = Instant::now();
    let allowed = match uri.path() {
        "/v1/score" | "/v1/rank" => "POST",
        _ => "GET",
    };
    let r = (
        [(header::ALLOW, allowed)],
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} {}: this route takes {allowed}", uri.path()),
        },
    )
        .into_response();
    timed(&state, "other", start, r)
}

pub async fn not_found(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    let start = Instant::now();
    let r = ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no route {}: the routes are POST /v1/score, POST /v1/rank, GET /health, GET /metrics, GET /openapi.json",
            uri.path()
        ),
    }
    .into_response();
    timed(&state, "other", start, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_errors_map_to_4xx_for_the_request_and_500_for_the_model() {
        let status = |e: WorkerError| ApiError::from(e).status;
        assert_eq!(
            status(RequestError::UnknownUser { id: 9, max: 3 }.into()),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(RequestError::UnknownItem { id: 9, max: 3 }.into()),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(RequestError::Invalid("no".into()).into()),
            StatusCode::BAD_REQUEST
        );
        let e = ApiError::from(WorkerError::Scoring("out of memory".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "scoring failed: out of memory");
    }
}
