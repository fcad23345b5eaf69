//! Engine errors as the Python exceptions a caller expects: `FileNotFoundError` for a missing
//! file, `ValueError` for input the caller must fix, `RuntimeError` for the rest.

use collm::recommend::RequestError;
use collm_core::io::InputError;
use collm_core::progress::Interrupted;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Maps an engine error to the Python exception a caller expects.
pub(crate) fn py_err(e: anyhow::Error) -> PyErr {
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
pub(crate) fn config_err(e: anyhow::Error) -> anyhow::Error {
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
