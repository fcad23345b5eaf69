//! Metrics from Python: AUC, UAUC and the report of a split's scores.

use crate::bridge::blocking;
use crate::convert::json_to_py;
use collm_core::io::InputError;
use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;

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
pub(crate) fn _auc(
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
pub(crate) fn _uauc(
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
pub(crate) fn _subsets(
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
