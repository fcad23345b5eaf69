//! The bridge between the engine's threads and Python: log records and progress ticks queued
//! by the engine, delivered to `logging` and a `progress=` callback by the calling thread at the
//! engine's ticks (at most every 100 ms), signals checked there, and [`blocking`], which runs an
//! engine call with the GIL released.

use crate::errors::py_err;
use anyhow::Result;
use collm_core::progress::{self, Event, Sink};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
pub(crate) fn blocking<T: Send>(
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

/// Routes the engine's progress ticks and `tracing` records to this module's queue (once, at
/// import); `COLLM_LOG` filters the records as in the binary.
pub(crate) fn install() {
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
}
