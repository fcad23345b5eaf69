//! Adam, in PyTorch's two flavours: `Adam` with L2 weight decay added to the gradient (what the
//! reference trains its collaborative models with) and `AdamW` with decoupled decay (what it
//! trains the LLM side with). Each parameter has its own decay, so "decay ≥2-D weights only"
//! is a choice of the caller. The state saves and loads, so a resumed run continues exactly.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    /// `g ← g + λ·θ` before the moments (torch.optim.Adam).
    L2,
    /// `θ ← θ − lr·λ·θ` beside the update (torch.optim.AdamW).
    Decoupled,
}

pub struct Adam {
    params: Vec<(String, Var, f64)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub decay: Decay,
}

impl Adam {
    /// `params`: (name, variable, weight decay).
    pub fn new(params: Vec<(String, Var, f64)>, lr: f64, decay: Decay) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, v, _)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay,
        })
    }

    /// Gradients of every parameter, or None for one the loss does not reach.
    pub fn grads<'a>(&'a self, grads: &'a GradStore) -> Vec<(&'a str, Option<&'a Tensor>)> {
        self.params
            .iter()
            .map(|(n, v, _)| (n.as_str(), grads.get(v.as_tensor())))
            .collect()
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let g: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, v, _)| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_with(&g)
    }

    /// The parameters, in the order [`Adam::step_with`] expects their gradients.
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().map(|(_, v, _)| v).collect()
    }

    /// One update with explicit gradients (one per parameter, None = not reached), e.g. after
    /// accumulation or clipping.
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (k, (_, var, wd)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(k).and_then(|g| g.as_ref()) else {
                continue;
            };
            let theta = var.as_tensor().detach();
            let mut g = g.detach();
            if *wd != 0.0 && self.decay == Decay::L2 {
                g = (g + (&theta * *wd)?)?;
            }
            self.m[k] = ((&self.m[k] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            self.v[k] = ((&self.v[k] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&self.m[k] / bc1)?;
            let v_hat = (&self.v[k] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let mut next = (&theta - (update * self.lr)?)?;
            if *wd != 0.0 && self.decay == Decay::Decoupled {
                next = (next - (&theta * (self.lr * wd))?)?;
            }
            var.set(&next)?;
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (k, (name, _, _)) in self.params.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[k].clone());
            t.insert(format!("v.{name}"), self.v[k].clone());
        }
        let dev = self.m.first().map(|m| m.device().clone());
        if let Some(dev) = dev {
            t.insert(
                "step".into(),
                Tensor::new(&[self.step as f64], &dev)?.to_dtype(candle_core::DType::F64)?,
            );
        }
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&t, &tmp)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        collm_core::io::set_umask_mode(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .m
            .first()
            .map(|m| m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let t = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        for (name, v) in &t {
            crate::ensure_finite(v, path, name)?;
        }
        for (k, (name, _, _)) in self.params.iter().enumerate() {
            self.m[k] = t
                .get(&format!("m.{name}"))
                .with_context(|| format!("{}: no state for {name}", path.display()))?
                .clone();
            self.v[k] = t
                .get(&format!("v.{name}"))
                .with_context(|| format!("{}: no state for {name}", path.display()))?
                .clone();
        }
        if let Some(s) = t.get("step") {
            self.step = s.to_vec1::<f64>()?[0] as u64;
        }
        Ok(())
    }
}

/// Global L2 norm of gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(candle_core::DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Scales gradients so that their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
