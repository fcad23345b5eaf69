//! `collm._collm`: the engine under the Python package `collm` (python/collm). A thin layer:
//! every call is the library's own function (the same the `collm` binary runs), with
//!
//! - the GIL released while Rust computes on the calling thread; at the engine's progress ticks
//!   (each training step, each scoring batch), at most every 100 ms, the GIL is taken back to
//!   hand the engine's log records and ticks to Python (`logging`, a `progress=` callback) and
//!   to check for signals: Ctrl-C asks the engine to stop at its next step
//!   ([`collm_core::progress::interrupt`]) and raises `KeyboardInterrupt` once it has;
//! - errors as Python exceptions with the CLI's messages: `FileNotFoundError` for a missing
//!   file, `ValueError` for input the caller must fix (a file's line, a field, an id, a config),
//!   `RuntimeError` for the rest;
//! - arrays in and out as numpy buffers (no Python object per element).
//!
//! The rooms: [`bridge`] (the GIL, logging and progress), [`errors`] (exceptions),
//! [`convert`] (numpy and JSON values), [`recommender`] (`collm.Recommender`), [`jobs`]
//! (training, data preparation, the report), [`metrics`] and [`data`] (columns, the tiny
//! backbone); this file is the module table.

mod bridge;
mod convert;
mod data;
mod errors;
mod jobs;
mod metrics;
mod recommender;

use pyo3::prelude::*;

// mimalloc, freed memory kept, as in the binary (see collm::alloc): the engine's training and
// scoring speed from Python is the binary's.
#[global_allocator]
static GLOBAL: collm::alloc::Allocator = collm::alloc::Allocator;

#[pymodule]
fn _collm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    collm::alloc::keep_freed_memory();
    bridge::install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<recommender::PyRecommender>()?;
    m.add_function(wrap_pyfunction!(jobs::_train_cf, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::_cf_config_json, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::_train, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::_prepare, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::report, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::_auc, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::_uauc, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::_subsets, m)?)?;
    m.add_function(wrap_pyfunction!(data::_split_columns, m)?)?;
    m.add_function(wrap_pyfunction!(data::_write_tiny_backbone, m)?)?;
    m.add_function(wrap_pyfunction!(_flush_denormals, m)?)?;
    Ok(())
}

/// Flushes subnormal floats to zero (or keeps them) on the calling thread and the engine's
/// threads; returns whether they were flushed before (collm_core::denormals).
#[pyfunction]
fn _flush_denormals(flush: bool) -> PyResult<bool> {
    if !collm_core::denormals::supported() {
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "flushing subnormal floats is x86-64 only",
        ));
    }
    let before = collm_core::denormals::flushing();
    collm_core::denormals::set(flush);
    Ok(before)
}
