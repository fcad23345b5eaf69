//! LightGCN (reference `LightGCN` + `rec_gnndataset.py`): a bipartite graph over users and
//! items from the **train positives**, symmetric normalisation `D^-1/2 A D^-1/2` without
//! self-loops (duplicate pairs add up), K propagation layers, output = mean of layers 0..K,
//! score = dot product. The whole graph is propagated on every forward pass, as in the
//! reference, with a gather / scatter-add over the edge list (both have backward passes).

use crate::nn::{index_tensor, rowwise_dot};
use crate::params::{Init, ParamStore};
use crate::{CfBatch, CfConfig, CfOutput, CollaborativeModel, ModelKind, TrainCtx};
use anyhow::Result;
use candle_core::{Device, Tensor};
use collm_data::Interaction;
use std::collections::HashMap;

/// The normalised adjacency as an edge list: `out[dst] += weight · in[src]`.
pub struct Graph {
    pub num_nodes: usize,
    pub src: Vec<u32>,
    pub dst: Vec<u32>,
    pub weight: Vec<f32>,
}

impl Graph {
    /// Users are nodes `0..num_users`, items `num_users..num_users + num_items`.
    pub fn from_train(num_users: usize, num_items: usize, train: &[Interaction]) -> Self {
        let mut edges: HashMap<(u32, u32), f32> = HashMap::new();
        for r in train.iter().filter(|r| r.label == 1) {
            *edges.entry((r.uid, num_users as u32 + r.iid)).or_default() += 1.0;
        }
        let n = num_users + num_items;
        let mut degree = vec![0f32; n];
        for (&(u, i), &w) in &edges {
            degree[u as usize] += w;
            degree[i as usize] += w;
        }
        let mut pairs: Vec<_> = edges.into_iter().collect();
        pairs.sort_by_key(|&(k, _)| k);
        let (mut src, mut dst, mut weight) = (Vec::new(), Vec::new(), Vec::new());
        for ((u, i), w) in pairs {
            let norm = w / (degree[u as usize] * degree[i as usize]).sqrt();
            for (a, b) in [(u, i), (i, u)] {
                src.push(a);
                dst.push(b);
                weight.push(norm);
            }
        }
        Self {
            num_nodes: n,
            src,
            dst,
            weight,
        }
    }

    /// The dense normalised adjacency (tests and small graphs only).
    pub fn dense(&self) -> Vec<Vec<f32>> {
        let mut a = vec![vec![0f32; self.num_nodes]; self.num_nodes];
        for k in 0..self.src.len() {
            a[self.dst[k] as usize][self.src[k] as usize] += self.weight[k];
        }
        a
    }
}

pub struct LightGcn {
    ps: ParamStore,
    users: Tensor,
    items: Tensor,
    src: Tensor,
    dst: Tensor,
    weight: Tensor,
    num_users: usize,
    layers: usize,
    dim: usize,
}

impl LightGcn {
    pub fn new(
        cfg: &CfConfig,
        num_users: usize,
        num_items: usize,
        train: &[Interaction],
        dev: &Device,
    ) -> Result<Self> {
        let mut ps = ParamStore::new(dev, cfg.seed);
        let init = Init::Normal { std: cfg.init_std };
        // One table over all nodes: users first, then items.
        let users = ps.param("user_embedding.weight", &[num_users, cfg.dim], init)?;
        let items = ps.param("item_embedding.weight", &[num_items, cfg.dim], init)?;
        let g = Graph::from_train(num_users, num_items, train);
        let e = g.src.len();
        Ok(Self {
            ps,
            users,
            items,
            src: index_tensor(&g.src, &[e], dev)?,
            dst: index_tensor(&g.dst, &[e], dev)?,
            weight: Tensor::from_vec(g.weight, (e, 1), dev)?,
            num_users,
            layers: cfg.layers,
            dim: cfg.dim,
        })
    }

    /// Mean of the embeddings after 0..K propagation steps, for every node.
    pub fn propagate(&self) -> Result<Tensor> {
        // Concatenated on every call: the tables are updated in place by the optimizer.
        let mut layer = Tensor::cat(&[&self.users, &self.items], 0)?;
        let mut sum = layer.clone();
        for _ in 0..self.layers {
            let messages = layer
                .index_select(&self.src, 0)?
                .broadcast_mul(&self.weight)?;
            layer = layer.zeros_like()?.index_add(&self.dst, &messages, 0)?;
            sum = (sum + &layer)?;
        }
        Ok((sum / (self.layers + 1) as f64)?)
    }
}

impl CollaborativeModel for LightGcn {
    fn kind(&self) -> ModelKind {
        ModelKind::LightGcn
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn history_len(&self) -> usize {
        0
    }
    fn forward(&self, b: &CfBatch, _ctx: Option<&TrainCtx>) -> Result<CfOutput> {
        let all = self.propagate()?;
        let u = all.index_select(&b.users, 0)?;
        // Item nodes follow the user nodes.
        let nodes: Vec<u32> = b
            .items
            .to_vec1::<u32>()?
            .into_iter()
            .map(|i| i + self.num_users as u32)
            .collect();
        let i = all.index_select(&index_tensor(&nodes, &[nodes.len()], all.device())?, 0)?;
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
