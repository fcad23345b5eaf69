//! The LLM engine benchmark behind `collm bench llm`: LoRA train steps (forward, backward,
//! AdamW) and scoring passes on random weights of a named shape, with the time of a train step
//! split into host-side preparation, forward, backward and optimizer, tokens/s, and peak
//! memory. The shapes and the step are those of `../shared/bench/ref_lora_throughput.py`
//! (LoRA r 8, alpha 16, dropout 0.05 on q and v; AdamW; BCE on the " Yes" logit of the last
//! position), so that its numbers and these compare.

use crate::load::{bench_shape, random_weights};
use crate::{dtype_name, Decoder, Lora, LoraConfig, Mask, Pass};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use collm_nn::optim::{Adam, Decay};
use collm_nn::TrainCtx;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct LlmBench {
    /// A shape of [`bench_shape`] (tiny, smollm2-135m, qwen2.5-0.5b-shape, vicuna-7b).
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub dtype: DType,
    pub steps: usize,
    pub warm: usize,
    /// The fused CPU kernels (`true`) or the composed candle ops.
    pub fused: bool,
}

/// Mean seconds per train step in each phase.
#[derive(Debug, Clone, Serialize)]
pub struct StepBreakdown {
    /// Host-side preparation: token ids, embedding lookup, mask.
    pub prep_s: f64,
    /// Decoder forward, logits and loss.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LlmBenchRow {
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub dtype: String,
    pub device: String,
    /// "fused" or "composed".
    pub path: String,
    pub threads: usize,
    pub train_samples_per_s: f64,
    pub train_tokens_per_s: f64,
    pub infer_samples_per_s: f64,
    pub infer_tokens_per_s: f64,
    pub step: StepBreakdown,
    /// Process peak RSS after the train steps and after scoring (Linux; CPU memory).
    pub peak_rss_train_gib: Option<f64>,
    pub peak_rss_gib: Option<f64>,
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak-RSS counter (Linux `clear_refs` 5), so that a row's peak is its own as far
/// as memory held from earlier rows allows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs one benchmark row.
pub fn measure(b: &LlmBench, device: &Device) -> Result<LlmBenchRow> {
    let cfg = bench_shape(&b.model)?;
    let mut dec = Decoder::new(
        &cfg,
        &random_weights(&cfg, b.dtype, device)?,
        b.dtype,
        device,
    )?;
    dec.set_fused(b.fused)?;
    let lora = Lora::new(&LoraConfig::default(), &cfg, 0, device)?;
    let params = lora
        .trainable()
        .into_iter()
        .map(|(n, v)| (n, v, 1e-3))
        .collect();
    let mut opt = Adam::new(params, 1e-4, Decay::Decoupled)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (batch, seq) = (b.batch, b.seq);
    let labels = Tensor::from_vec(
        (0..batch).map(|k| (k % 2) as f32).collect::<Vec<_>>(),
        batch,
        device,
    )?;
    let mut prep = || -> Result<(Tensor, Mask)> {
        let ids: Vec<u32> = (0..batch * seq)
            .map(|_| rng.gen_range(10..cfg.vocab_size as u32))
            .collect();
        let mask = Mask::left_padded(&vec![seq; batch], seq);
        let emb = dec.embed(&ids)?.reshape((batch, seq, cfg.hidden_size))?;
        Ok((emb, mask))
    };
    let sync = || device.synchronize();
    let mut phases = [0f64; 4];
    let mut step = |k: usize, record: bool, opt: &mut Adam| -> Result<()> {
        let mut t = Instant::now();
        let mut lap = |i: usize, t: &mut Instant| -> Result<()> {
            sync()?;
            if record {
                phases[i] += t.elapsed().as_secs_f64();
            }
            *t = Instant::now();
            Ok(())
        };
        let (emb, mask) = prep()?;
        lap(0, &mut t)?;
        let ctx = TrainCtx::new(k as u64);
        let pass = Pass {
            lora: Some(&lora),
            train: Some(&ctx),
            grad: true,
        };
        let h = dec.forward(&emb, &mask, &pass)?;
        let yes = dec
            .token_logits(&h, &mask.last_positions(), &[3], &pass)?
            .squeeze(1)?;
        let loss = collm_nn::layers::bce_with_logits(&yes, &labels)?;
        lap(1, &mut t)?;
        let grads = loss.backward()?;
        lap(2, &mut t)?;
        opt.step(&grads)?;
        lap(3, &mut t)?;
        Ok(())
    };
    reset_peak_rss();
    for k in 0..b.warm {
        step(k, false, &mut opt)?;
    }
    sync()?;
    let t = Instant::now();
    for k in 0..b.steps {
        step(b.warm + k, true, &mut opt)?;
    }
    sync()?;
    let train_s = t.elapsed().as_secs_f64() / b.steps as f64;
    let peak_train = peak_rss_mib().map(|m| m / 1024.0);

    let (emb, mask) = prep()?;
    let last = mask.last_positions();
    let score = || -> Result<()> {
        let pass = Pass {
            lora: Some(&lora),
            train: None,
            grad: false,
        };
        let h = dec.forward(&emb, &mask, &pass)?;
        dec.token_logits(&h, &last, &[4, 3], &pass)?
            .to_vec2::<f32>()?;
        Ok(())
    };
    for _ in 0..b.warm {
        score()?;
    }
    sync()?;
    let t = Instant::now();
    for _ in 0..b.steps {
        score()?;
    }
    sync()?;
    let infer_s = t.elapsed().as_secs_f64() / b.steps as f64;
    let n = b.steps as f64;
    Ok(LlmBenchRow {
        model: b.model.clone(),
        batch,
        seq,
        dtype: dtype_name(b.dtype).into(),
        device: format!("{device:?}"),
        path: if b.fused { "fused" } else { "composed" }.into(),
        threads: rayon::current_num_threads(),
        train_samples_per_s: batch as f64 / train_s,
        train_tokens_per_s: (batch * seq) as f64 / train_s,
        infer_samples_per_s: batch as f64 / infer_s,
        infer_tokens_per_s: (batch * seq) as f64 / infer_s,
        step: StepBreakdown {
            prep_s: phases[0] / n,
            forward_s: phases[1] / n,
            backward_s: phases[2] / n,
            optimizer_s: phases[3] / n,
        },
        peak_rss_train_gib: peak_train,
        peak_rss_gib: peak_rss_mib().map(|m| m / 1024.0),
    })
}
