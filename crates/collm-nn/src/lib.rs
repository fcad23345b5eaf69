//! Training building blocks shared by the collaborative models and the LLM side: parameters
//! initialised from a seeded RNG (candle's CPU RNG cannot be seeded), layers written with
//! differentiable tensor ops (several of candle's fused ops record no backward pass), and
//! Adam / AdamW with saveable state.

pub mod layers;
pub mod optim;
pub mod params;

pub use layers::TrainCtx;
pub use params::{Init, ParamStore};
