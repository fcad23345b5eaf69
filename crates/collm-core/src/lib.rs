//! The ground floor every other collm crate stands on: nothing here knows of datasets, models
//! or runs.
//!
//! - [`io`]: line readers (plain or gzip, with a progress bar), atomic writes and directories,
//!   the output lock, the crash points the crash-safety tests inject;
//! - [`progress`]: progress bars, the sink the Python package reads ticks from, interrupts;
//! - [`fields`]: the range check of numeric config fields, and the fields two configs differ in;
//! - [`machine`]: this CPU's description and this process's peak resident memory.

pub mod denormals;
pub mod fields;
pub mod io;
pub mod machine;
pub mod progress;
