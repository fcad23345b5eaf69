//! Collaborative models — the "CF" half of CoLLM's hybrid encoding (paper §3, §4.1.2) and
//! baselines of its Table 2.
//!
//! Every model implements [`CollaborativeModel`]: for a batch of (user, item, history) it
//! returns the click logit and the user/item representations `u` and `i` (dimension d1) that
//! the CIE mapper lifts into the LLM's embedding space (paper Eq. (1)/(3)):
//!
//! | model | u | i |
//! |---|---|---|
//! | MF | user table row | item table row |
//! | LightGCN | propagated user row | propagated item row |
//! | SASRec | encoding of the last L history items | item embedding |
//! | DIN | [target item, attention-pooled last-10 history, user] | item embedding ×3 |
//!
//! A new model is a new file implementing the trait plus one line in [`ModelKind`] and
//! [`build_model`]; the other models are not touched.

pub mod batch;
#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
pub mod din;
pub mod lightgcn;
pub mod mf;
pub mod run;
pub mod sasrec;
pub mod sweep;
pub mod train;

use anyhow::Result;
pub use batch::CfBatch;
use candle_core::{Device, Tensor};
use collm_data::Dataset;
pub use collm_nn::{layers as nn, optim, params, ParamStore, TrainCtx};
pub use config::{CfConfig, ModelKind};

/// What a collaborative model gives for a batch.
pub struct CfOutput {
    /// Click logits, shape (B,).
    pub score: Tensor,
    /// User-side representation `u`, shape (B, d1).
    pub user: Tensor,
    /// Item-side representation `i`, shape (B, d1).
    pub item: Tensor,
}

/// A collaborative model: scores and representations for a batch.
pub trait CollaborativeModel: Send + Sync {
    fn kind(&self) -> ModelKind;
    /// d1: the size of `u` and `i`.
    fn dim(&self) -> usize;
    /// How many of the most recent history items the model reads (0: none).
    fn history_len(&self) -> usize;
    /// `ctx` is `Some` in training (dropout, batch statistics) and `None` in evaluation.
    fn forward(&self, batch: &CfBatch, ctx: Option<&TrainCtx>) -> Result<CfOutput>;
    fn params(&self) -> &ParamStore;
    /// Whether `u` depends on the target item (DIN's attention over the history is queried
    /// by it): then a prompt's user slot is not shared by that user's candidates.
    fn user_depends_on_item(&self) -> bool {
        false
    }
}

/// Builds a freshly initialised model for a dataset (LightGCN builds its graph from the
/// dataset's train split).
pub fn build_model(
    cfg: &CfConfig,
    ds: &Dataset,
    device: &Device,
) -> Result<Box<dyn CollaborativeModel>> {
    let (nu, ni) = (ds.num_users(), ds.num_items());
    Ok(match cfg.model {
        ModelKind::Mf => Box::new(mf::Mf::new(cfg, nu, ni, device)?),
        ModelKind::LightGcn => Box::new(lightgcn::LightGcn::new(
            cfg,
            nu,
            ni,
            &ds.train()?.rows,
            device,
        )?),
        ModelKind::SasRec => Box::new(sasrec::SasRec::new(cfg, ni, device)?),
        ModelKind::Din => Box::new(din::Din::new(cfg, nu, ni, device)?),
    })
}
