//! Dataset columns as numpy arrays, and the tiny random backbone for tests and examples.

use crate::bridge::blocking;
use crate::errors::py_err;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// A split of a dataset directory as columns: `uid`, `iid`, `label`, `timestamp` (numpy).
#[pyfunction]
pub(crate) fn _split_columns(py: Python<'_>, data: PathBuf, split: String) -> PyResult<Py<PyDict>> {
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
pub(crate) fn _write_tiny_backbone(dir: PathBuf, seed: u64) -> PyResult<()> {
    collm_llm::testing::write_tiny_backbone(&dir, seed).map_err(py_err)
}
