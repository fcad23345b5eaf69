//! Matrix factorisation: score = ⟨user row, item row⟩, no biases (reference
//! `MatrixFactorization`).

use crate::nn::rowwise_dot;
use crate::params::{Init, ParamStore};
use crate::{CfBatch, CfConfig, CfOutput, CollaborativeModel, ModelKind, TrainCtx};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub struct Mf {
    ps: ParamStore,
    users: Tensor,
    items: Tensor,
    dim: usize,
}

impl Mf {
    pub fn new(cfg: &CfConfig, num_users: usize, num_items: usize, dev: &Device) -> Result<Self> {
        let mut ps = ParamStore::new(dev, cfg.seed);
        let init = Init::Normal { std: cfg.init_std };
        let users = ps.param("user_embedding.weight", &[num_users, cfg.dim], init)?;
        let items = ps.param("item_embedding.weight", &[num_items, cfg.dim], init)?;
        Ok(Self {
            ps,
            users,
            items,
            dim: cfg.dim,
        })
    }
}

impl CollaborativeModel for Mf {
    fn kind(&self) -> ModelKind {
        ModelKind::Mf
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn history_len(&self) -> usize {
        0
    }
    fn forward(&self, b: &CfBatch, _ctx: Option<&TrainCtx>) -> Result<CfOutput> {
        let u = self.users.index_select(&b.users, 0)?;
        let i = self.items.index_select(&b.items, 0)?;
        Ok(CfOutput {
            score: rowwise_dot(&u, &i)?,
            user: u,
            item: i,
        })
    }
    fn params(&self) -> &ParamStore {
        &self.ps
    }
}
