//! Wall time per fused op, for `collm bench llm --op-times`: each op's forward and backward
//! pass opens a [`span`] on the thread that runs it (candle's CPU ops run eagerly, one after
//! the other, on the caller's thread; their parallel loops inside are part of the span).
//! Spans opened inside another span on the same thread (a LoRA dropout mask inside its
//! projection, the products inside an op) are kept apart as nested. Off unless [`record`]
//! turned it on: then a span is one relaxed atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
/// (name, nested, total time, calls), in first-seen order.
static TABLE: Mutex<Vec<(&'static str, bool, Duration, u64)>> = Mutex::new(Vec::new());

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// An open span: its time is added to its name's total when dropped.
pub struct Span {
    name: &'static str,
    nested: bool,
    start: Instant,
}

/// Opens a span named `name` while recording is on (else `None`).
#[inline]
pub fn span(name: &'static str) -> Option<Span> {
    if !ON.load(Ordering::Relaxed) {
        return None;
    }
    let nested = DEPTH.with(|d| {
        let depth = d.get();
        d.set(depth + 1);
        depth > 0
    });
    Some(Span {
        name,
        nested,
        start: Instant::now(),
    })
}

impl Drop for Span {
    fn drop(&mut self) {
        let spent = self.start.elapsed();
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        match table
            .iter_mut()
            .find(|(n, nested, ..)| *n == self.name && *nested == self.nested)
        {
            Some(row) => {
                row.2 += spent;
                row.3 += 1;
            }
            None => table.push((self.name, self.nested, spent, 1)),
        }
    }
}

/// One op's totals since recording started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    pub name: &'static str,
    /// Opened inside another span (its time is part of that span's too).
    pub nested: bool,
    pub seconds: f64,
    pub calls: u64,
}

/// Starts recording (clearing what was recorded before) or stops it.
pub fn record(on: bool) {
    if on {
        TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    ON.store(on, Ordering::Relaxed);
}

/// What was recorded, in the order the spans first closed.
pub fn recorded() -> Vec<OpTime> {
    TABLE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|&(name, nested, d, calls)| OpTime {
            name,
            nested,
            seconds: d.as_secs_f64(),
            calls,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_by_name_and_nesting_and_cost_nothing_when_off() {
        // Other tests may run ops (and so open spans) meanwhile: only this test's names count.
        record(false);
        assert!(span("off").is_none());
        record(true);
        for _ in 0..3 {
            let _outer = span("outer");
            std::thread::sleep(Duration::from_millis(2));
            let _inner = span("inner");
            std::thread::sleep(Duration::from_millis(1));
        }
        record(false);
        let got: Vec<OpTime> = recorded()
            .into_iter()
            .filter(|o| o.name == "outer" || o.name == "inner")
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        let by = |name: &str| got.iter().find(|o| o.name == name).expect("recorded");
        let (outer, inner) = (by("outer"), by("inner"));
        assert_eq!((outer.name, outer.nested, outer.calls), ("outer", false, 3));
        assert_eq!((inner.name, inner.nested, inner.calls), ("inner", true, 3));
        assert!(outer.seconds >= 0.009 && inner.seconds >= 0.003, "{got:?}");
        assert!(outer.seconds > inner.seconds);
        record(true);
        assert!(
            recorded().iter().all(|o| o.name != "outer"),
            "record(true) clears"
        );
        record(false);
    }
}
