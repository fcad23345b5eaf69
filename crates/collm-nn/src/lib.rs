//! Training building blocks shared by the collaborative models and the LLM side: parameters
//! initialised from a seeded RNG (candle's CPU RNG cannot be seeded), layers written with
//! differentiable tensor ops (several of candle's fused ops record no backward pass), and
//! Adam / AdamW with saveable state.

pub mod layers;
pub mod optim;
pub mod params;
pub mod run;
pub mod scaffold;

pub use layers::TrainCtx;
pub use params::{Init, ParamStore};

/// Refuses a weight that holds NaN or ±inf (a corrupt or hostile file), naming the file and the
/// tensor. One reduction on the tensor's device: `x - x` is 0 for every finite `x` and NaN
/// otherwise, so the sum is 0 exactly when every element is finite.
pub fn ensure_finite(
    t: &candle_core::Tensor,
    file: &std::path::Path,
    name: &str,
) -> anyhow::Result<()> {
    let t = if t.dtype().is_float() {
        t.to_dtype(candle_core::DType::F32)?
    } else {
        return Ok(());
    };
    #[allow(clippy::eq_op)] // x - x is the point: NaN exactly for non-finite x
    let s = (&t - &t)?.sum_all()?.to_scalar::<f32>()?;
    if s != 0.0 {
        anyhow::bail!(
            "{}: tensor '{name}' holds NaN or infinite values (the file is corrupt)",
            file.display()
        );
    }
    Ok(())
}
