//! A frozen projection's weight as the ops read it: the f32 tensor, or (where the process's
//! kernel multiplies in bf16, see [`KernelChoice`]) its bf16 packing alone, from which the
//! tensor is rebuilt for the composed ops that need it.

use super::cpu::bf16::{Bf16Weight, Kernel, KernelChoice};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// A frozen weight (out, in).
#[derive(Clone)]
pub struct Weight {
    /// The tensor; `None` when the weight lives in `packed` only (its f32 copy dropped).
    tensor: Option<Tensor>,
    packed: Option<(Kernel, Arc<Bf16Weight>)>,
    dims: (usize, usize),
    device: Device,
    dtype: DType,
}

impl Weight {
    /// `w` as it is: multiplied in its own dtype.
    pub fn plain(w: &Tensor) -> Result<Self> {
        Ok(Self {
            dims: w.dims2()?,
            tensor: Some(w.clone()),
            packed: None,
            device: w.device().clone(),
            dtype: w.dtype(),
        })
    }

    /// `w` for the kernel `choice` gives a weight of its shape: packed for a bf16 kernel (an f32
    /// weight on the CPU; its f32 copy is dropped), else as it is.
    pub fn new(w: &Tensor, choice: KernelChoice) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let kernel = choice.for_weight(out, inp);
        if !(kernel.is_bf16() && w.device().is_cpu() && w.dtype() == DType::F32) {
            return Self::plain(w);
        }
        kernel.available().map_err(candle_core::Error::msg)?;
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            dims: (out, inp),
            tensor: None,
            packed: Some((kernel, Arc::new(Bf16Weight::new(&v, out, inp)))),
            device: w.device().clone(),
            dtype: w.dtype(),
        })
    }

    /// (out, in).
    pub fn dims2(&self) -> (usize, usize) {
        self.dims
    }

    /// The kernel that multiplies it.
    pub fn kernel(&self) -> Kernel {
        self.packed.as_ref().map_or(Kernel::F32, |p| p.0)
    }

    /// Its bf16 packing and the kernel that multiplies it (None: f32).
    pub fn bf16(&self) -> Option<(Kernel, &Bf16Weight)> {
        self.packed.as_ref().map(|(k, w)| (*k, &**w))
    }

    /// The weight as a tensor: the one it holds, or rebuilt from its bf16 values (for the
    /// composed ops, which tests and benchmarks run beside the kernels).
    pub fn tensor(&self) -> Result<Tensor> {
        match (&self.tensor, &self.packed) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some((_, p))) => {
                Tensor::from_vec(p.to_f32(), self.dims, &self.device)?.to_dtype(self.dtype)
            }
            (None, None) => unreachable!("a weight holds a tensor or a packing"),
        }
    }

    /// Bytes its values take in memory.
    pub fn bytes(&self) -> usize {
        match (&self.tensor, &self.packed) {
            (_, Some((_, p))) => p.bytes(),
            (Some(t), None) => t.elem_count() * t.dtype().size_in_bytes(),
            (None, None) => 0,
        }
    }
}
