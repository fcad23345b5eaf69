//! CoLLM (Zhang et al., 2023) in the order of the paper's Figure 2:
//!
//! data ([`collm_data`]) → [`prompt`] construction → hybrid encoding ([`cie`]: a collaborative
//! model from [`collm_cf`] + the mapper) → LLM prediction ([`model`], on [`collm_llm`]) →
//! metrics ([`collm_metrics`]).
//!
//! [`experiment`] holds the run config and modes (CoLLM's steps and variants, the baselines),
//! [`run`] the run directory (its files, references, weights; loading and evaluating a run),
//! [`train`] the training loop, [`pipeline`] the jobs the binary
//! runs (evaluating any run, the quickstart). Tables and charts are in [`collm_report`].

pub mod alloc;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cie;
pub mod compact;
pub mod ctrl;
pub mod experiment;
pub mod model;
pub mod pipeline;
pub mod prompt;
pub mod recommend;
pub mod run;
pub mod score;
#[cfg(feature = "testing")]
pub mod testing;
pub mod train;

pub use experiment::{ExperimentConfig, Mode};
pub use model::CoLlm;
