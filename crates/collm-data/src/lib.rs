//! The first box of CoLLM's pipeline (paper, Figure 2): raw interaction logs become a
//! *dataset directory* — time-ordered train/valid/test splits with per-row histories, item
//! titles and a manifest — that every later stage (prompt construction, collaborative models,
//! the LLM, metrics) reads.
//!
//! - [`sources`]: one module per raw format (`ml-1m`, `amazon-book`, `collm-tsv`, `synthetic`).
//! - [`history`]: the reference's history rule and id remapping, shared by all sources.
//! - [`dataset`]: the on-disk layout, its manifest and the in-memory [`Dataset`].
//! - [`subsets`]: warm/cold/seen row subsets used by the metrics.
//! - [`stats`]: the paper's Table 1 and more.
//!
//! File writing, progress, config-field checks and the machine's description are the ground
//! floor's ([`collm_core`]).

#[cfg(feature = "bench")]
pub mod bench;
pub mod dataset;
pub mod history;
pub mod sources;
pub mod stats;
pub mod subsets;

pub use dataset::{Dataset, Interaction, Manifest, Split};
