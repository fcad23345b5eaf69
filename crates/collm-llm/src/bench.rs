//! The LLM engine benchmark behind `collm bench llm`: LoRA train steps (forward, backward,
//! AdamW) and scoring passes on random weights of a named shape, with the time of a train step
//! split into host-side preparation, forward, backward and optimizer, tokens/s, and peak
//! memory. The shapes and the step are those of `../shared/bench/ref_lora_throughput.py`
//! (LoRA r 8, alpha 16, dropout 0.05 on q and v; AdamW; BCE on the " Yes" logit of the last
//! position), so that its numbers and these compare.

use crate::load::{bench_shape, random_weights};
use crate::ops::cpu::times::{self, OpTime};
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
    /// Time each fused op during the timed train steps ([`crate::ops::cpu::times`]).
    pub op_times: bool,
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
    /// The FLOP rates, counted as `../shared/bench/ref_lora_throughput.py` counts them (a
    /// forward pass is 2 × non-embedding parameters per token; a train step two forward
    /// passes), so they compare with its `train_tflops` / `infer_tflops`.
    pub train_gflops: f64,
    pub infer_gflops: f64,
    /// CPU: this machine's f32 matmul rate on the shape of an MLP projection of this batch
    /// ([`crate::ops::cpu::gemm_gflops`]), measured in the same run: the ceiling of any f32 engine
    /// here. `None` on other devices.
    pub gemm_gflops: Option<f64>,
    /// The kernel the projections ran with (`f32`, `bf16`, `amx`, `emulated`), and how it was
    /// chosen.
    pub kernel: String,
    pub kernel_choice: String,
    /// CPU: the same rate with that kernel when it is a bf16 one (the activations' packing
    /// included), same run.
    pub kernel_gflops: Option<f64>,
    /// Bytes of the projections' weights as held (f32, or their bf16 packings), in MiB.
    pub projection_mib: f64,
    /// This CPU (model, family, SIMD features, threads).
    pub cpu: String,
    /// With [`LlmBench::op_times`]: each fused op's seconds and calls per train step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_times: Option<Vec<OpTime>>,
}

/// Forward FLOPs of one pass over `tokens` tokens, as the reference script counts them.
pub fn forward_flop(cfg: &crate::LlamaConfig, tokens: usize) -> f64 {
    let (h, i, l) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    );
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let params = l * (2 * h * q + 2 * h * kv + 3 * h * i);
    2.0 * params as f64 * tokens as f64
}

pub use collm_core::machine::{peak_rss_mib, reset_peak_rss};

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
        let h = dec.forward_at(&emb, &mask, &pass, &mask.last_positions())?;
        let yes = dec
            .token_logits(&h, &vec![0; batch], &[3], &pass)?
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
    times::record(b.op_times);
    let t = Instant::now();
    for k in 0..b.steps {
        step(b.warm + k, true, &mut opt)?;
    }
    sync()?;
    let train_s = t.elapsed().as_secs_f64() / b.steps as f64;
    times::record(false);
    let op_times = b.op_times.then(|| {
        times::recorded()
            .into_iter()
            .map(|o| OpTime {
                seconds: o.seconds / b.steps as f64,
                calls: o.calls / b.steps as u64,
                ..o
            })
            .collect()
    });
    let peak_train = peak_rss_mib().map(|m| m / 1024.0);

    let (emb, mask) = prep()?;
    let last = mask.last_positions();
    let score = || -> Result<()> {
        let pass = Pass {
            lora: Some(&lora),
            train: None,
            grad: false,
        };
        let h = dec.forward_at(&emb, &mask, &pass, &last)?;
        dec.token_logits(&h, &vec![0; batch], &[4, 3], &pass)?
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
    let flop = forward_flop(&cfg, batch * seq);
    let gemm = device.is_cpu().then(|| {
        crate::ops::cpu::gemm_gflops(batch * seq, cfg.intermediate_size, cfg.hidden_size, 3)
    });
    let kernel = dec.kernel();
    let kernel_gflops = (device.is_cpu() && kernel.is_bf16()).then(|| {
        crate::ops::cpu::bf16::gflops(
            kernel,
            batch * seq,
            cfg.intermediate_size,
            cfg.hidden_size,
            3,
        )
    });
    let choice = if device.is_cpu() && b.dtype == DType::F32 {
        crate::ops::kernel_choice()
            .map(|c| c.describe())
            .unwrap_or_else(|e| e)
    } else {
        "f32 (not an f32 CPU decoder)".into()
    };
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
        train_gflops: 2.0 * flop / train_s / 1e9,
        infer_gflops: flop / infer_s / 1e9,
        gemm_gflops: gemm,
        kernel: kernel.name().into(),
        kernel_choice: choice,
        kernel_gflops,
        projection_mib: dec.projection_bytes() as f64 / (1 << 20) as f64,
        cpu: collm_core::machine::cpu_description(),
        op_times,
    })
}

/// A row's forward FLOPs per sample, from its measured rate and throughput.
fn forward_flop_per_sample(r: &LlmBenchRow) -> f64 {
    r.infer_gflops * 1e9 / r.infer_samples_per_s
}

/// A row's train step split by fused op: ms per step and share of the step, the products
/// nested inside the ops apart, and what is left outside the ops.
fn render_op_times(r: &LlmBenchRow, ops: &[OpTime]) -> String {
    let s = &r.step;
    let step = s.prep_s + s.forward_s + s.backward_s + s.optimizer_s;
    render_op_split(
        &format!(
            "{} b{} train step by op ({} kernel",
            r.model, r.batch, r.kernel
        ),
        (step, "per step"),
        ops,
        "outside the ops (graph, adds, AdamW)",
    )
}

/// A span of work (`total_s` seconds) split by the fused ops recorded in it ([`times`]): a
/// header `{title}; N ms {per}):` (the title opens the parenthesis), then each op's ms and share of the span, largest first, what is
/// left outside the ops (named `outside`), and the products nested inside the ops apart. Used
/// by `collm bench llm --op-times` and `collm bench train --op-times`.
pub fn render_op_split(
    title: &str,
    (total_s, per): (f64, &str),
    ops: &[OpTime],
    outside: &str,
) -> String {
    use std::fmt::Write as _;
    let mut out = format!("{title}; {:.0} ms {per}):\n", 1e3 * total_s);
    let line = |out: &mut String, name: &str, secs: f64, calls: u64| {
        let _ = writeln!(
            out,
            "  {name:<38} {:>8.1} ms {:>5.1}%  {calls:>5} calls",
            1e3 * secs,
            100.0 * secs / total_s
        );
    };
    let mut top: Vec<&OpTime> = ops.iter().filter(|o| !o.nested).collect();
    top.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for o in &top {
        line(&mut out, o.name, o.seconds, o.calls);
    }
    let inside: f64 = top.iter().map(|o| o.seconds).sum();
    line(&mut out, outside, total_s - inside, 0);
    let _ = writeln!(out, "  inside the ops above:");
    for o in ops.iter().filter(|o| o.nested) {
        line(&mut out, o.name, o.seconds, o.calls);
    }
    out
}

/// The table `collm bench llm` prints for its rows.
pub fn render(rows: &[LlmBenchRow], dtype: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>5} {:>4} {:<8} {:>8} {:>9} {:>8} {:>9}  {:>5} {:>5} {:>5} {:>5}  {:>9}  {:>17}",
        "model",
        "batch",
        "seq",
        "path",
        "train/s",
        "tok/s",
        "score/s",
        "tok/s",
        "prep",
        "fwd",
        "bwd",
        "opt",
        "peak GiB",
        "GF/s train/score"
    );
    for r in rows {
        let s = &r.step;
        let total = s.prep_s + s.forward_s + s.backward_s + s.optimizer_s;
        let pct = |x: f64| 100.0 * x / total;
        let _ = writeln!(out,
            "{:<20} {:>5} {:>4} {:<8} {:>8.2} {:>9.0} {:>8.2} {:>9.0}  {:>4.0}% {:>4.0}% {:>4.0}% {:>4.0}%  {:>9.2}  {:>8.1}/{:<8.1}",
            r.model,
            r.batch,
            r.seq,
            r.path,
            r.train_samples_per_s,
            r.train_tokens_per_s,
            r.infer_samples_per_s,
            r.infer_tokens_per_s,
            pct(s.prep_s),
            pct(s.forward_s),
            pct(s.backward_s),
            pct(s.optimizer_s),
            r.peak_rss_train_gib.unwrap_or(f64::NAN),
            r.train_gflops,
            r.infer_gflops
        );
    }
    for r in rows {
        let _ = writeln!(
            out,
            "kernel: {}; projections {:.0} MiB{}",
            r.kernel_choice,
            r.projection_mib,
            r.kernel_gflops
                .map(|k| format!("; {} products here {k:.1} GF/s", r.kernel))
                .unwrap_or_default()
        );
        if let Some(g) = r.gemm_gflops {
            let per_sample = forward_flop_per_sample(r);
            let _ = writeln!(
                out,
                "{} b{}: f32 matmul here {g:.1} GF/s, so at most {:.2} train/s and {:.2} score/s for any f32 engine ({:.0}% and {:.0}% reached)",
                r.model,
                r.batch,
                g * 1e9 / (2.0 * per_sample),
                g * 1e9 / per_sample,
                100.0 * r.train_gflops / g,
                100.0 * r.infer_gflops / g
            );
        }
    }
    for r in rows {
        if let Some(ops) = &r.op_times {
            out.push_str(&render_op_times(r, ops));
        }
    }
    let _ = writeln!(out,
        "({} {}, {} threads, {}; step shares: host prep, forward, backward, optimizer; peak RSS of the train steps)",
        dtype,
        rows.first().map_or("", |r| r.device.as_str()),
        rows.first().map_or(0, |r| r.threads),
        rows.first().map_or("", |r| r.cpu.as_str())
    );
    out
}
