//! Conversions between numpy / Python values and the engine's: id arrays, JSON, TOML tables,
//! ranked lists.

use anyhow::{anyhow, Context, Result};
use collm::recommend::Ranked;
use collm_core::io::InputError;
use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pub(crate) fn slice<'a>(name: &str, a: &'a PyReadonlyArray1<'_, i64>) -> PyResult<&'a [i64]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(format!("{name}: not a contiguous array: {e}")))
}

pub(crate) fn ids(name: &str, a: &PyReadonlyArray1<'_, i64>) -> Result<Vec<u64>> {
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

pub(crate) fn json_to_py(py: Python<'_>, v: &impl serde::Serialize) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// A TOML table from a mapping passed as JSON text (`json.dumps` of the dict).
pub(crate) fn table_from_json(text: &str, what: &str) -> Result<toml::Table> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{what}: not a mapping"))?;
    toml::Table::try_from(v)
        .map_err(|e| InputError(format!("{what}: cannot be a TOML table: {e}")).into())
}

pub(crate) fn ranked_to_py(py: Python<'_>, ranked: &[Ranked]) -> PyResult<Py<PyList>> {
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
