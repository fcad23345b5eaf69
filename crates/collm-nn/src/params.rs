//! Named, seeded parameters. candle's `VarMap` initialises from the thread RNG, which cannot be
//! seeded on the CPU; runs must be reproducible, so every tensor here is drawn from a ChaCha RNG
//! derived from the run's seed and the parameter's name.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Normal, Uniform};
use std::collections::BTreeMap;
use std::path::Path;

/// How a parameter starts.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// Xavier/Glorot normal for a (fan_out, fan_in) matrix.
    XavierNormal,
}

/// A parameter store: trainable parameters and buffers (running statistics), by name.
pub struct ParamStore {
    device: Device,
    seed: u64,
    vars: BTreeMap<String, (Var, bool)>,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: stable across platforms and versions.
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            device: device.clone(),
            seed,
            vars: BTreeMap::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn make(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, name));
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal { std } => {
                let d = Normal::new(0.0, std)?;
                (0..n).map(|_| d.sample(&mut rng) as f32).collect()
            }
            Init::Uniform { bound } => {
                let d = Uniform::new_inclusive(-bound, bound);
                (0..n).map(|_| d.sample(&mut rng) as f32).collect()
            }
            Init::XavierNormal => {
                let (fan_out, fan_in) = match shape {
                    [o, i] => (*o, *i),
                    _ => (n, n),
                };
                let d = Normal::new(0.0, (2.0 / (fan_in + fan_out) as f64).sqrt())?;
                (0..n).map(|_| d.sample(&mut rng) as f32).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    /// A trainable parameter (created on first use).
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.get_or_make(name, shape, init, true)
    }

    /// A buffer: saved with the model, never trained.
    pub fn buffer(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.get_or_make(name, shape, init, false)?;
        Ok(self.vars[name].0.clone())
    }

    fn get_or_make(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        trainable: bool,
    ) -> Result<Tensor> {
        if let Some((v, _)) = self.vars.get(name) {
            if v.dims() != shape {
                bail!("parameter {name}: shape {:?}, expected {shape:?}", v.dims());
            }
            return Ok(v.as_tensor().clone());
        }
        let var = Var::from_tensor(&self.make(name, shape, init)?)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), (var, trainable));
        Ok(t)
    }

    /// The trainable parameters, by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .filter(|(_, (_, t))| *t)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).map(|(v, _)| v)
    }

    pub fn names(&self) -> Vec<String> {
        self.vars.keys().cloned().collect()
    }

    pub fn num_trainable(&self) -> usize {
        self.vars
            .values()
            .filter(|(_, t)| *t)
            .map(|(v, _)| v.elem_count())
            .sum()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.as_tensor().clone()))
            .collect();
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        collm_core::io::set_umask_mode(&tmp)?;
        collm_core::io::crash_point();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot rename into place", path.display()))?;
        Ok(())
    }

    /// Overwrites every parameter from a safetensors file; every name must be there with the
    /// right shape, and the file must hold nothing else.
    pub fn load(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("{}: cannot read model weights", path.display()))?;
        for (name, (var, _)) in &self.vars {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: tensor '{name}' is missing", path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, the model expects {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            crate::ensure_finite(t, path, name)?;
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().find(|k| !self.vars.contains_key(*k)) {
            bail!(
                "{}: unexpected tensor '{extra}' (weights of another model?)",
                path.display()
            );
        }
        Ok(())
    }
}

impl ParamStore {
    /// Overwrites the parameters a safetensors file holds (a model's part trained elsewhere:
    /// CTRL's aligned embeddings under a new head); the others keep their values. Every tensor
    /// of the file must be a parameter of this store with its shape. Returns the names loaded.
    pub fn load_some(&self, path: &Path) -> Result<Vec<String>> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("{}: cannot read model weights", path.display()))?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        for name in &names {
            let Some((var, _)) = self.vars.get(name) else {
                bail!(
                    "{}: tensor '{name}' is not a parameter of this model (weights of another model?)",
                    path.display()
                );
            };
            let t = &tensors[name];
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, the model expects {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            crate::ensure_finite(t, path, name)?;
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(names)
    }
}

/// What [`compact_file`] did to one weights file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compacted {
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The largest relative change of any weight, `|x - q(x)| / max|x|` over each tensor.
    pub max_rel_change: f64,
}

/// Writes the safetensors file `path` to `dst` with its f32 tensors stored in `dtype` (`F16`
/// or `BF16`); other tensors (integers, already half) are kept as they are. Loading converts
/// back to f32 ([`ParamStore::load`]), so a compacted file loads where the f32 one did, with
/// each weight rounded once. Refused, with nothing written, when a value would not survive
/// the rounding (out of f16's range: it would become infinite). `dst == path` replaces the
/// file atomically.
pub fn compact_file(path: &Path, dtype: DType, dst: &Path) -> Result<Compacted> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        bail!("compact: dtype must be f16 or bf16, not {dtype:?}");
    }
    let bytes_before = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read weights", path.display()))?;
    let mut out = std::collections::HashMap::new();
    let mut max_rel_change = 0f64;
    for (name, t) in tensors {
        if t.dtype() != DType::F32 {
            out.insert(name, t);
            continue;
        }
        let q = t.to_dtype(dtype)?;
        crate::ensure_finite(&q, path, &name).with_context(|| {
            format!(
                "{}: tensor '{name}' does not fit in {dtype:?} (kept the file as it was)",
                path.display()
            )
        })?;
        let scale = t.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        if scale > 0.0 {
            let err = (q.to_dtype(DType::F32)? - &t)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()? as f64;
            max_rel_change = max_rel_change.max(err / scale);
        }
        out.insert(name, q);
    }
    let tmp = dst.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&out, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    collm_core::io::set_umask_mode(&tmp)?;
    collm_core::io::crash_point();
    std::fs::rename(&tmp, dst)
        .with_context(|| format!("{}: cannot rename into place", dst.display()))?;
    Ok(Compacted {
        bytes_before,
        bytes_after: std::fs::metadata(dst)?.len(),
        max_rel_change,
    })
}
