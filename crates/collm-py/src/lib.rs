//! `collm._collm`: the engine under the Python package `collm` (python/collm). A thin layer:
//! every call is the library's own function (the same the `collm` binary runs), with
//!
//! - the GIL released while Rust computes on the calling thread; at the engine's progress ticks
//!   (each training step, each scoring batch), at most every 100 ms, the GIL is taken back to
//!   hand the engine's log records and ticks to Python (`logging`, a `progress=` callback) and
//!   to check for signals: Ctrl-C asks the engine to stop at its next step
//!   ([`collm_data::progress::interrupt`]) and raises `KeyboardInterrupt` once it has;
//! - errors as Python exceptions with the CLI's messages: `FileNotFoundError` for a missing
//!   file, `ValueError` for input the caller must fix (a file's line, a field, an id, a config),
//!   `RuntimeError` for the rest;
//! - arrays in and out as numpy buffers (no Python object per element).

use anyhow::{anyhow, bail, Context, Result};
use collm::recommend::{Ranked, Recommender as Engine, RequestError};
use collm_data::io::InputError;
use collm_data::progress::{self, Event, Interrupted, Sink};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// mimalloc, freed memory kept, as in the binary (see collm::alloc): the engine's training and
// scoring speed from Python is the binary's.
#[global_allocator]
static GLOBAL: collm::alloc::Allocator = collm::alloc::Allocator;

// ---------------------------------------------------------------------------------------
// Errors

/// Maps an engine error to the Python exception a caller expects.
fn py_err(e: anyhow::Error) -> PyErr {
    let msg = format!("{e:#}");
    for c in e.chain() {
        if c.is::<Interrupted>() {
            return PyKeyboardInterrupt::new_err(msg);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return PyFileNotFoundError::new_err(msg);
            }
        }
        if c.is::<InputError>()
            || c.is::<RequestError>()
            || c.is::<toml::de::Error>()
            || c.is::<serde_json::Error>()
        {
            return PyValueError::new_err(msg);
        }
    }
    PyRuntimeError::new_err(msg)
}

/// A config (file or mapping) the engine refused: the caller's to fix, unless it is missing.
fn config_err(e: anyhow::Error) -> anyhow::Error {
    let missing = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    if missing {
        e
    } else {
        InputError(format!("{e:#}")).into()
    }
}

// ---------------------------------------------------------------------------------------
// Log records and progress ticks, queued by the engine's threads, delivered by the caller's

enum Msg {
    Log { level: u8, text: String },
    Tick(Tick),
}

#[derive(Clone)]
struct Tick {
    task: String,
    unit: String,
    pos: u64,
    len: u64,
    message: Option<String>,
}

#[derive(Default)]
struct Queue(Mutex<VecDeque<Msg>>);

impl Queue {
    fn push(&self, m: Msg) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A caller that never drains (a call made outside `blocking`) must not grow it forever.
        if q.len() >= 10_000 {
            q.pop_front();
        }
        q.push_back(m);
    }
    fn take(&self) -> Vec<Msg> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }
}

fn queue() -> &'static Arc<Queue> {
    static Q: OnceLock<Arc<Queue>> = OnceLock::new();
    Q.get_or_init(|| Arc::new(Queue::default()))
}

struct QueueSink(Arc<Queue>);

impl Sink for QueueSink {
    fn event(&self, e: &Event<'_>) {
        self.0.push(Msg::Tick(Tick {
            task: e.task.to_string(),
            unit: e.unit.to_string(),
            pos: e.pos,
            len: e.len,
            message: e.message.map(str::to_string),
        }));
        poll();
    }
}

/// The engine's `tracing` events as Python log records (levels as `logging`'s numbers).
struct LogLayer(Arc<Queue>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => 40,
            tracing::Level::WARN => 30,
            tracing::Level::INFO => 20,
            _ => 10,
        };
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0.push(Msg::Log {
            level,
            text: f.0.trim().to_string(),
        });
    }
}

/// Hands queued records to `logging.getLogger("collm")` and ticks to `progress` (each tick
/// as `progress(task, pos, len, message)`). Position-only ticks are coalesced to the last of
/// each task; ticks with a message (a validation's AUC) are also logged at INFO.
fn deliver(py: Python<'_>, progress_cb: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let msgs = queue().take();
    if msgs.is_empty() {
        return Ok(());
    }
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("collm",))?;
    let mut last: Vec<Tick> = Vec::new();
    let flush = |last: &mut Vec<Tick>| -> PyResult<()> {
        for t in last.drain(..) {
            if let Some(cb) = progress_cb {
                cb.call1((t.task.as_str(), t.pos, t.len, t.message.as_deref()))?;
            }
            let line = format!("{}: {} {}/{}", t.task, t.unit, t.pos, t.len);
            logger.call_method1("log", (10, line))?;
        }
        Ok(())
    };
    for m in msgs {
        match m {
            Msg::Log { level, text } => {
                flush(&mut last)?;
                logger.call_method1("log", (level, text))?;
            }
            Msg::Tick(t) if t.message.is_some() => {
                flush(&mut last)?;
                if let Some(cb) = progress_cb {
                    cb.call1((t.task.as_str(), t.pos, t.len, t.message.as_deref()))?;
                }
                let line = format!(
                    "{}: {} {}/{} {}",
                    t.task,
                    t.unit,
                    t.pos,
                    t.len,
                    t.message.as_deref().unwrap_or("")
                );
                logger.call_method1("log", (20, line))?;
            }
            Msg::Tick(t) => match last.iter_mut().find(|x| x.task == t.task) {
                Some(x) => *x = t,
                None => last.push(t),
            },
        }
    }
    flush(&mut last)
}

/// The Python call in progress on this thread: its callback, when its queue was last
/// delivered, and the exception that stops it (a signal, a failing callback).
struct Call {
    progress: Option<Py<PyAny>>,
    last: Instant,
    stop: Option<PyErr>,
}

thread_local! {
    static CALL: RefCell<Option<Call>> = const { RefCell::new(None) };
}

/// At an engine tick on the calling thread, at most every 100 ms: takes the GIL, delivers the
/// queue and checks for signals; a signal (or a failing callback) asks the engine to stop.
fn poll() {
    CALL.with(|c| {
        // Busy: a callback of this very call is running (and ticking a nested call).
        let Ok(mut slot) = c.try_borrow_mut() else {
            return;
        };
        let Some(call) = slot.as_mut() else {
            return;
        };
        if call.last.elapsed() < Duration::from_millis(100) {
            return;
        }
        Python::attach(|py| {
            if let Err(e) = deliver(py, call.progress.as_ref().map(|p| p.bind(py))) {
                call.stop.get_or_insert(e);
            }
            if call.stop.is_none() {
                if let Err(e) = py.check_signals() {
                    call.stop = Some(e);
                }
            }
        });
        if call.stop.is_some() {
            progress::interrupt();
        }
        call.last = Instant::now();
    });
}

/// Runs `f` with the GIL released, on the calling thread (as the binary runs it: the engine's
/// compute pool is entered from outside, and this thread's heap is warm); see the module's
/// documentation. Signals are seen at the engine's ticks (every training step, every scoring
/// batch), so Ctrl-C stops a long call within one step.
fn blocking<T: Send>(
    py: Python<'_>,
    progress_cb: Option<&Bound<'_, PyAny>>,
    f: impl FnOnce() -> Result<T> + Send,
) -> PyResult<T> {
    progress::clear_interrupt();
    let call = Call {
        progress: progress_cb.map(|p| p.clone().unbind()),
        last: Instant::now(),
        stop: None,
    };
    let outer = CALL.with(|c| c.replace(Some(call)));
    let r = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    let call = CALL
        .with(|c| c.replace(outer))
        .expect("this call's context");
    progress::clear_interrupt();
    let mut stop = call.stop;
    if let Err(e) = deliver(py, progress_cb) {
        stop.get_or_insert(e);
    }
    match (r, stop) {
        // Stopped by a signal or callback: its own exception, unless the call finished
        // before it saw the request (then its result stands).
        (Ok(Ok(v)), _) => Ok(v),
        (_, Some(e)) => Err(e),
        (Ok(Err(e)), None) => Err(py_err(e)),
        (Err(panic), None) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!(
                "collm: internal error (a panic): {what}"
            )))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Conversions

fn slice<'a>(name: &str, a: &'a PyReadonlyArray1<'_, i64>) -> PyResult<&'a [i64]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(format!("{name}: not a contiguous array: {e}")))
}

fn ids(name: &str, a: &PyReadonlyArray1<'_, i64>) -> Result<Vec<u64>> {
    let s = a
        .as_slice()
        .map_err(|e| anyhow!("{name}: not a contiguous array: {e}"))?;
    s.iter()
        .enumerate()
        .map(|(k, &v)| {
            u64::try_from(v)
                .map_err(|_| InputError(format!("{name}[{k}] = {v}: ids are positive")).into())
        })
        .collect()
}

fn json_to_py(py: Python<'_>, v: &impl serde::Serialize) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// A TOML table from a mapping passed as JSON text (`json.dumps` of the dict).
fn table_from_json(text: &str, what: &str) -> Result<toml::Table> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{what}: not a mapping"))?;
    toml::Table::try_from(v)
        .map_err(|e| InputError(format!("{what}: cannot be a TOML table: {e}")).into())
}

fn ranked_to_py(py: Python<'_>, ranked: &[Ranked]) -> PyResult<Py<PyList>> {
    let list = PyList::empty(py);
    for r in ranked {
        let d = PyDict::new(py);
        d.set_item("item", r.item)?;
        d.set_item("score", r.score)?;
        d.set_item("title", r.title.as_str())?;
        list.append(d)?;
    }
    Ok(list.unbind())
}

// ---------------------------------------------------------------------------------------
// The recommender

/// A trained run (CoLLM or collaborative model), ready to score, rank and evaluate.
#[pyclass(subclass, module = "collm._collm", name = "Recommender")]
struct PyRecommender {
    inner: Engine,
    run: PathBuf,
}

#[pymethods]
impl PyRecommender {
    #[new]
    #[pyo3(signature = (run, data=None))]
    fn new(py: Python<'_>, run: PathBuf, data: Option<PathBuf>) -> PyResult<Self> {
        let r = run.clone();
        let inner = blocking(py, None, move || Engine::open(&r, data.as_deref()))?;
        Ok(Self { inner, run })
    }

    /// "collm" or "cf".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.inner.kind {
            collm_metrics::RunKind::Collm => "collm",
            collm_metrics::RunKind::Cf => "cf",
        }
    }

    #[getter]
    fn run(&self) -> PathBuf {
        self.run.clone()
    }

    /// The largest user id (ids run from 1).
    #[getter]
    fn max_user(&self) -> u32 {
        self.inner.max_user()
    }

    /// The largest item id (ids run from 1).
    #[getter]
    fn max_item(&self) -> u32 {
        self.inner.max_item()
    }

    /// An item's title.
    fn title(&self, item: u64) -> PyResult<String> {
        let i = self
            .inner
            .item(item)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(self.inner.dataset.title(i).to_string())
    }

    /// Logits of (user, item) pairs, in order (P(Yes) = sigmoid).
    #[pyo3(signature = (users, items, progress=None))]
    fn _score<'py>(
        &self,
        py: Python<'py>,
        users: PyReadonlyArray1<'py, i64>,
        items: PyReadonlyArray1<'py, i64>,
        progress: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let (u, i) = (slice("users", &users)?, slice("items", &items)?);
        if u.len() != i.len() {
            return Err(PyValueError::new_err(format!(
                "users and items differ in length ({} and {})",
                u.len(),
                i.len()
            )));
        }
        let rec = &self.inner;
        let scores = blocking(py, progress, move || {
            let rows = u
                .iter()
                .zip(i)
                .enumerate()
                .map(|(k, (&u, &i))| {
                    let bad = |e: String| InputError(format!("pair {k} (user {u}, item {i}): {e}"));
                    let (Ok(uu), Ok(ii)) = (u64::try_from(u), u64::try_from(i)) else {
                        return Err(bad("ids are positive".into()));
                    };
                    rec.row(uu, ii).map_err(|e| bad(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            rec.score_rows(&rows, true)
        })?;
        Ok(PyArray1::from_vec(py, scores))
    }

    /// The `k` best items for a known `user` or for a cold user given by `history` (liked
    /// item ids, oldest first), among `candidates` (default: every item not seen).
    #[pyo3(signature = (user=None, history=None, k=10, candidates=None, progress=None))]
    fn rank(
        &self,
        py: Python<'_>,
        user: Option<u64>,
        history: Option<Vec<u64>>,
        k: usize,
        candidates: Option<Vec<u64>>,
        progress: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyList>> {
        if k == 0 {
            return Err(PyValueError::new_err("k must be at least 1"));
        }
        let rec = &self.inner;
        let who = match (user, history) {
            (Some(u), None) => rec.user(u),
            (None, Some(h)) => rec.cold_user(&h),
            _ => {
                return Err(PyValueError::new_err(
                    "give user= (a known user id) or history= (liked item ids), not both",
                ))
            }
        }
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let cands = candidates
            .map(|c| {
                c.iter()
                    .map(|&i| rec.item(i))
                    .collect::<Result<Vec<u32>, _>>()
            })
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let ranked = blocking(py, progress, move || {
            rec.rank(&who, k, cands.as_deref(), true)
        })?;
        ranked_to_py(py, &ranked)
    }

    /// AUC and UAUC of a split, overall and on the warm/cold subsets: the dict `collm eval
    /// --json` prints. With `scores=True`, `(report, scores)`.
    #[pyo3(signature = (split="valid", scores=false, progress=None))]
    fn evaluate(
        &self,
        py: Python<'_>,
        split: &str,
        scores: bool,
        progress: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let rec = &self.inner;
        let split = split.to_string();
        let (s, report) = blocking(py, progress, move || rec.evaluate(&split, true))?;
        let report = json_to_py(py, &report)?;
        if scores {
            let arr = PyArray1::from_vec(py, s);
            Ok((report, arr).into_pyobject(py)?.into_any().unbind())
        } else {
            Ok(report)
        }
    }

    /// Benchmarks only: seconds the library takes for `score(users, items)` without Python
    /// (the rows built and scored in Rust, the GIL released), for the overhead benchmark.
    fn _bench_library_seconds(
        &self,
        py: Python<'_>,
        users: PyReadonlyArray1<'_, i64>,
        items: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<f64> {
        let (u, i) = (
            ids("users", &users).map_err(py_err)?,
            ids("items", &items).map_err(py_err)?,
        );
        let rec = &self.inner;
        py.detach(|| {
            let t = std::time::Instant::now();
            let rows = u
                .iter()
                .zip(&i)
                .map(|(&u, &i)| rec.row(u, i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!(e))?;
            let s = rec.score_rows(&rows, false)?;
            std::hint::black_box(s);
            Ok(t.elapsed().as_secs_f64())
        })
        .map_err(py_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "Recommender(run={:?}, kind={}, users={}, items={})",
            self.run.display().to_string(),
            self.kind(),
            self.inner.max_user(),
            self.inner.max_item()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Training, data, reports

/// Trains a collaborative model (`collm train cf`); returns its metrics.json as a dict.
#[pyfunction]
#[pyo3(signature = (data, out, config_json, resume=false, force=false, progress=None))]
fn _train_cf(
    py: Python<'_>,
    data: PathBuf,
    out: PathBuf,
    config_json: String,
    resume: bool,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let metrics = blocking(py, progress, move || {
        let t = table_from_json(&config_json, "config")?;
        let text = toml::to_string(&t).context("config")?;
        let cfg = collm_cf::CfConfig::from_toml(&text, "config").map_err(config_err)?;
        let ds = collm_data::Dataset::load(&data)?;
        collm_cf::train::train(
            &cfg,
            &ds,
            &out,
            &collm_cf::train::TrainOptions {
                resume,
                force,
                quiet: false,
                init: None,
            },
        )
    })?;
    json_to_py(py, &metrics)
}

/// Reads a collaborative-model config file into JSON text (the Python side merges overrides).
#[pyfunction]
fn _cf_config_json(path: PathBuf) -> PyResult<String> {
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))
        .map_err(py_err)?;
    let t: toml::Table = toml::from_str(&text)
        .map_err(|e| InputError(format!("{}: {e}", path.display())))
        .map_err(|e| py_err(e.into()))?;
    serde_json::to_string(&t).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Trains a CoLLM run (`collm train collm`) from a config file or a mapping (JSON text);
/// returns its metrics.json as a dict.
#[pyfunction]
#[pyo3(signature = (config, config_json, out, resume=false, force=false, progress=None))]
fn _train(
    py: Python<'_>,
    config: Option<PathBuf>,
    config_json: Option<String>,
    out: PathBuf,
    resume: bool,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let state = blocking(py, progress, move || {
        let cfg = match (config, config_json) {
            (Some(p), None) => collm::ExperimentConfig::load(&p),
            (None, Some(j)) => table_from_json(&j, "config").and_then(|t| {
                let c = collm::ExperimentConfig::from_table(t, "config")?;
                c.validate().context("config")?;
                Ok(c)
            }),
            _ => bail!("give a config file or a mapping"),
        }
        .map_err(config_err)?;
        collm::train::train(
            &cfg,
            &out,
            &collm::train::TrainOptions {
                resume,
                force,
                quiet: false,
                stop_after: None,
            },
        )
    })?;
    json_to_py(py, &state)
}

/// Prepares a dataset directory (`collm data prepare SOURCE`); options as JSON text.
#[pyfunction]
#[pyo3(signature = (source, out, options_json, force=false, progress=None))]
fn _prepare(
    py: Python<'_>,
    source: String,
    out: PathBuf,
    options_json: String,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    use collm_data::sources::{amazon, synthetic, Source};
    let manifest = blocking(py, progress, move || {
        let o: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&options_json).context("options")?;
        let mut o = Opts(o);
        let src = match source.as_str() {
            "ml-1m" => Source::Ml1m {
                raw: o.path("raw")?,
            },
            "amazon-book" => Source::AmazonBook {
                reviews: o.path("reviews")?,
                meta: o.path("meta")?,
                options: amazon::AmazonOptions {
                    year: o.get("year")?.unwrap_or(2017),
                    activity_threshold: o.get("activity_threshold")?.unwrap_or(20),
                },
            },
            "collm-tsv" => Source::CollmTsv {
                input: o.path("input")?,
                name: o.get("name")?,
                item_noun: o.get("item_noun")?.unwrap_or_else(|| "movie".into()),
            },
            "synthetic" => {
                let d = synthetic::SyntheticOptions::default();
                Source::Synthetic(synthetic::SyntheticOptions {
                    users: o.get("users")?.unwrap_or(d.users),
                    items: o.get("items")?.unwrap_or(d.items),
                    rows_per_user: o.get("rows_per_user")?.unwrap_or(d.rows_per_user),
                    factors: o.get("factors")?.unwrap_or(d.factors),
                    title_words: o.get("title_words")?.unwrap_or(d.title_words),
                    semantic_weight: o.get("semantic_weight")?.unwrap_or(d.semantic_weight),
                    taste_weight: o.get("taste_weight")?.unwrap_or(d.taste_weight),
                    collaborative_weight: o
                        .get("collaborative_weight")?
                        .unwrap_or(d.collaborative_weight),
                    train_until: o.get("train_until")?.unwrap_or(d.train_until),
                    valid_until: o.get("valid_until")?.unwrap_or(d.valid_until),
                    seed: o.get("seed")?.unwrap_or(d.seed),
                })
            }
            other => {
                return Err(InputError(format!(
                    "unknown source {other:?}: choose ml-1m, amazon-book, collm-tsv or synthetic"
                ))
                .into())
            }
        };
        o.finish(&source)?;
        Ok(collm_data::sources::prepare(&src, &out, force)?.manifest)
    })?;
    json_to_py(py, &manifest)
}

/// A source's options, each taken once; what is left over is refused by name.
struct Opts(serde_json::Map<String, serde_json::Value>);

impl Opts {
    fn get<T: serde::de::DeserializeOwned>(&mut self, k: &str) -> Result<Option<T>> {
        match self.0.remove(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| InputError(format!("option {k}={v}: {e}")).into()),
        }
    }
    fn path(&mut self, k: &str) -> Result<PathBuf> {
        self.get::<String>(k)?
            .map(PathBuf::from)
            .ok_or_else(|| InputError(format!("option {k}= is required")).into())
    }
    fn finish(self, source: &str) -> Result<()> {
        if let Some(k) = self.0.keys().next() {
            return Err(InputError(format!("source {source} has no option {k:?}")).into());
        }
        Ok(())
    }
}

/// `collm report`: the markdown table of `runs` on `split` (and with `out` its files).
#[pyfunction]
#[pyo3(signature = (runs, data=None, split="valid", out=None, progress=None))]
fn report(
    py: Python<'_>,
    runs: Vec<PathBuf>,
    data: Option<PathBuf>,
    split: &str,
    out: Option<PathBuf>,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let split = split.to_string();
    blocking(py, progress, move || {
        collm::pipeline::report(&runs, data.as_deref(), &split, out.as_deref())
    })
}

// ---------------------------------------------------------------------------------------
// Metrics

fn labels_of(a: &PyReadonlyArray1<'_, u8>) -> PyResult<Vec<u8>> {
    let s = a
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("labels: {e}")))?;
    if let Some(k) = s.iter().position(|&l| l > 1) {
        return Err(PyValueError::new_err(format!(
            "labels[{k}] = {}: labels are 0 or 1",
            s[k]
        )));
    }
    Ok(s.to_vec())
}

fn check_lengths(n: usize, others: &[(&str, usize)]) -> PyResult<()> {
    for (name, m) in others {
        if *m != n {
            return Err(PyValueError::new_err(format!(
                "{name} has {m} entries, labels {n}"
            )));
        }
    }
    Ok(())
}

/// ROC AUC (ties count one half); None when one class is missing.
#[pyfunction]
fn _auc(
    labels: PyReadonlyArray1<'_, u8>,
    scores: PyReadonlyArray1<'_, f64>,
) -> PyResult<Option<f64>> {
    let l = labels_of(&labels)?;
    let s = scores
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    check_lengths(l.len(), &[("scores", s.len())])?;
    Ok(collm_metrics::auc(&l, s))
}

/// UAUC: the mean of per-user AUCs over users with both classes; `(uauc, users counted)`.
#[pyfunction]
fn _uauc(
    labels: PyReadonlyArray1<'_, u8>,
    scores: PyReadonlyArray1<'_, f64>,
    users: PyReadonlyArray1<'_, i64>,
) -> PyResult<(Option<f64>, usize)> {
    let l = labels_of(&labels)?;
    let s = scores
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let u: Vec<u32> = users
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?
        .iter()
        .map(|&u| {
            u32::try_from(u).map_err(|_| PyValueError::new_err(format!("user id {u} out of range")))
        })
        .collect::<PyResult<_>>()?;
    check_lengths(l.len(), &[("scores", s.len()), ("users", u.len())])?;
    Ok(collm_metrics::uauc(&u, &l, s))
}

/// The report of `scores` (one per row of `split`, in order) on a dataset directory: what
/// `collm eval scores --json` prints.
#[pyfunction]
fn _subsets(
    py: Python<'_>,
    data: PathBuf,
    split: String,
    scores: PyReadonlyArray1<'_, f64>,
) -> PyResult<Py<PyAny>> {
    let s = scores
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?
        .to_vec();
    let report = blocking(py, None, move || {
        let ds = collm_data::Dataset::load(&data)?;
        let n = ds.split(&split)?.rows.len();
        if n != s.len() {
            return Err(InputError(format!(
                "{} scores for the {n} rows of split '{split}' of {}",
                s.len(),
                data.display()
            ))
            .into());
        }
        collm_metrics::Report::for_split(&ds, &split, &s)
    })?;
    json_to_py(py, &report)
}

/// A split of a dataset directory as columns: `uid`, `iid`, `label`, `timestamp` (numpy).
#[pyfunction]
fn _split_columns(py: Python<'_>, data: PathBuf, split: String) -> PyResult<Py<PyDict>> {
    let (u, i, l, t) = blocking(py, None, move || {
        let ds = collm_data::Dataset::load(&data)?;
        let rows = &ds.split(&split)?.rows;
        Ok((
            rows.iter().map(|r| i64::from(r.uid)).collect::<Vec<_>>(),
            rows.iter().map(|r| i64::from(r.iid)).collect::<Vec<_>>(),
            rows.iter().map(|r| r.label).collect::<Vec<_>>(),
            rows.iter().map(|r| r.timestamp).collect::<Vec<_>>(),
        ))
    })?;
    let d = PyDict::new(py);
    d.set_item("uid", PyArray1::from_vec(py, u))?;
    d.set_item("iid", PyArray1::from_vec(py, i))?;
    d.set_item("label", PyArray1::from_vec(py, l))?;
    d.set_item("timestamp", PyArray1::from_vec(py, t))?;
    Ok(d.unbind())
}

/// Writes a tiny random backbone (config.json, model.safetensors, tokenizer.json) to `dir`:
/// a model directory any config's `backbone` can name, for tests and examples.
#[pyfunction]
#[pyo3(signature = (dir, seed=1))]
fn _write_tiny_backbone(dir: PathBuf, seed: u64) -> PyResult<()> {
    collm_llm::testing::write_tiny_backbone(&dir, seed).map_err(py_err)
}

// ---------------------------------------------------------------------------------------
// The module

#[pymodule]
fn _collm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    collm::alloc::keep_freed_memory();
    let q = queue().clone();
    progress::set_sink(Some(Arc::new(QueueSink(q.clone()))));
    {
        use tracing_subscriber::prelude::*;
        let filter = tracing_subscriber::EnvFilter::try_from_env("COLLM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Another library in the process may have set one already: then it gets the records.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(LogLayer(q))
            .try_init();
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyRecommender>()?;
    m.add_function(wrap_pyfunction!(_train_cf, m)?)?;
    m.add_function(wrap_pyfunction!(_cf_config_json, m)?)?;
    m.add_function(wrap_pyfunction!(_train, m)?)?;
    m.add_function(wrap_pyfunction!(_prepare, m)?)?;
    m.add_function(wrap_pyfunction!(report, m)?)?;
    m.add_function(wrap_pyfunction!(_auc, m)?)?;
    m.add_function(wrap_pyfunction!(_uauc, m)?)?;
    m.add_function(wrap_pyfunction!(_subsets, m)?)?;
    m.add_function(wrap_pyfunction!(_split_columns, m)?)?;
    m.add_function(wrap_pyfunction!(_write_tiny_backbone, m)?)?;
    Ok(())
}
