//! Progress of long calls (training, scoring), and stopping them on request.
//!
//! Every loop that shows a bar ticks a [`Progress`]: it draws the terminal bar, or, when the
//! process has a [`Sink`] (the Python binding, which turns ticks into `logging` records and
//! `progress=` callbacks), forwards each tick there instead; a quiet one does neither (an inner
//! call of a call that shows its own progress). Each tick returns
//! [`Interrupted`] once [`interrupt`] was called, so that a Ctrl-C in a notebook stops a
//! training or scoring call at its next step. A training run stops at its next resumable point
//! with a checkpoint of where it stood (the scaffold's `Between`, in collm-nn), so nothing is
//! lost; a validation runs to its end first ([`defer_interrupts`]). On the command line,
//! SIGTERM, SIGINT and SIGHUP interrupt the same way while a [`StopOnSignals`] guard lives (the
//! `collm train` commands); a second such signal ends the process at once.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// One tick of a long call.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// What runs (the bar's prefix: `train collm`, `score`, `train mf`).
    pub task: &'a str,
    /// What is counted (`step`, `epoch`, `rows`).
    pub unit: &'a str,
    pub pos: u64,
    pub len: u64,
    /// The bar's message, when this tick set one (a validation's AUC).
    pub message: Option<&'a str>,
}

/// Where ticks go besides the bar.
pub trait Sink: Send + Sync {
    fn event(&self, e: &Event<'_>);
}

static SINK: RwLock<Option<Arc<dyn Sink>>> = RwLock::new(None);
static INTERRUPT: AtomicBool = AtomicBool::new(false);
/// Calls inside [`defer_interrupts`] now (process-wide: rayon's workers check too).
static DEFER: AtomicUsize = AtomicUsize::new(0);
/// The signal that interrupted the process (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Sets (or with `None` removes) the process's sink.
pub fn set_sink(sink: Option<Arc<dyn Sink>>) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// Whether the process has a sink (then no bar is drawn on the terminal).
pub fn has_sink() -> bool {
    SINK.read().unwrap_or_else(|e| e.into_inner()).is_some()
}

fn emit(e: &Event<'_>) {
    // Not under the lock: a sink may run code that starts another long call.
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(s) = sink {
        s.event(e);
    }
}

/// The error a long call returns when it was stopped by [`interrupt`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Asks every running long call to stop at its next tick.
pub fn interrupt() {
    INTERRUPT.store(true, Ordering::SeqCst);
}

/// Withdraws the request (before the next call starts).
pub fn clear_interrupt() {
    INTERRUPT.store(false, Ordering::SeqCst);
    SIGNAL.store(0, Ordering::SeqCst);
}

/// Has [`interrupt`] been called (whether or not inside [`defer_interrupts`])?
pub fn interrupt_asked() -> bool {
    INTERRUPT.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once [`interrupt`] was called, except inside [`defer_interrupts`].
pub fn check() -> Result<(), Interrupted> {
    if INTERRUPT.load(Ordering::SeqCst) && DEFER.load(Ordering::SeqCst) == 0 {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Runs `f` with interrupts held back: [`check`] (and every tick) passes while it runs, and an
/// interrupt asked meanwhile stays asked for the next check after it. For work that must end
/// whole to be worth anything (a validation whose result goes into the next checkpoint).
pub fn defer_interrupts<R>(f: impl FnOnce() -> R) -> R {
    struct Held;
    impl Drop for Held {
        fn drop(&mut self) {
            DEFER.fetch_sub(1, Ordering::SeqCst);
        }
    }
    DEFER.fetch_add(1, Ordering::SeqCst);
    let _held = Held;
    f()
}

/// The signal that interrupted this process through [`StopOnSignals`], if one did.
pub fn interrupting_signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// While it lives, SIGTERM, SIGINT and SIGHUP [`interrupt`] the process instead of ending it
/// (the running call stops at its next tick; a training run at its next step, with a
/// checkpoint); a second one while the first is pending ends the process at once, with exit
/// status 128 + the signal. Dropping it restores the signals' previous handling.
pub struct StopOnSignals {
    ids: Vec<signal_hook::SigId>,
}

impl StopOnSignals {
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            let action = move || {
                if INTERRUPT.swap(true, Ordering::SeqCst) && SIGNAL.load(Ordering::SeqCst) != 0 {
                    signal_hook::low_level::exit(128 + sig);
                }
                SIGNAL.store(sig, Ordering::SeqCst);
            };
            // SAFETY: the action only touches atomics and calls `_exit`, which are
            // async-signal-safe.
            let id = unsafe { signal_hook::low_level::register(sig, action) };
            match id {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self { ids })
    }
}

impl Drop for StopOnSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// A long call's progress: a terminal bar plus the sink's ticks.
pub struct Progress {
    bar: indicatif::ProgressBar,
    quiet: bool,
    task: String,
    unit: String,
    len: u64,
    pos: AtomicU64,
}

impl Progress {
    /// `len` units named `unit`: a bar on the terminal, or ticks to the sink when the process
    /// has one; neither when `quiet`.
    pub fn new(len: usize, unit: &str, task: String, quiet: bool) -> Self {
        let bar = if quiet || has_sink() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(len as u64)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:30}}] {unit} {{pos}}/{{len}} {{msg}} (eta {{eta}})"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(task.clone());
        Self {
            bar,
            quiet,
            task,
            unit: unit.to_string(),
            len: len as u64,
            pos: AtomicU64::new(0),
        }
    }

    fn tick(&self, message: Option<&str>) {
        if self.quiet {
            return;
        }
        emit(&Event {
            task: &self.task,
            unit: &self.unit,
            pos: self.pos.load(Ordering::Relaxed),
            len: self.len,
            message,
        });
    }

    /// Advances by `n`; `Err(Interrupted)` when the call was asked to stop.
    pub fn inc(&self, n: u64) -> Result<(), Interrupted> {
        self.bar.inc(n);
        self.pos.fetch_add(n, Ordering::Relaxed);
        self.tick(None);
        check()
    }

    /// Where a resumed call starts.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.pos.store(pos, Ordering::Relaxed);
    }

    /// A message beside the bar (and to the sink: a line worth logging).
    pub fn set_message(&self, msg: String) {
        self.tick(Some(&msg));
        self.bar.set_message(msg);
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Seen = (String, u64, u64, Option<String>);
    struct Record(Mutex<Vec<Seen>>);
    impl Sink for Record {
        fn event(&self, e: &Event<'_>) {
            self.0.lock().unwrap().push((
                e.task.to_string(),
                e.pos,
                e.len,
                e.message.map(str::to_string),
            ));
        }
    }

    // One test: the sink and the flag are process-wide.
    #[test]
    fn ticks_reach_the_sink_and_an_interrupt_stops_the_next_tick() {
        let rec = Arc::new(Record(Mutex::new(Vec::new())));
        set_sink(Some(rec.clone()));
        let p = Progress::new(4, "step", "train x".into(), false);
        let inner = Progress::new(9, "rows", "score".into(), true);
        inner.inc(1).unwrap();
        p.set_position(1);
        p.inc(1).unwrap();
        p.set_message("valid auc 0.7".into());
        interrupt();
        assert!(p.inc(1).is_err());
        // Held back inside defer_interrupts (nested too), asked again after it.
        defer_interrupts(|| {
            assert!(check().is_ok() && interrupt_asked());
            defer_interrupts(|| assert!(check().is_ok()));
            assert!(check().is_ok());
        });
        assert!(check().is_err());
        clear_interrupt();
        p.inc(1).unwrap();
        set_sink(None);
        p.inc(1).unwrap();
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                ("train x".into(), 2, 4, None),
                ("train x".into(), 2, 4, Some("valid auc 0.7".into())),
                ("train x".into(), 3, 4, None),
                ("train x".into(), 4, 4, None),
            ]
        );
    }
}
