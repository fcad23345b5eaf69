//! `collm.Recommender`: a trained run (CoLLM or collaborative model), ready to score, rank and
//! evaluate.

use crate::bridge::blocking;
use crate::convert::{ids, json_to_py, ranked_to_py, slice};
use crate::errors::py_err;
use anyhow::{anyhow, Result};
use collm::recommend::Recommender as Engine;
use collm_core::io::InputError;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::path::PathBuf;

/// A trained run (CoLLM or collaborative model), ready to score, rank and evaluate.
#[pyclass(subclass, module = "collm._collm", name = "Recommender")]
pub(crate) struct PyRecommender {
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
