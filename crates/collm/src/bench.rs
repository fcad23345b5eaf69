//! `collm bench train`: what a CoLLM run costs on a dataset's own prompts. A training step
//! (forward, backward, AdamW) and evaluation, each through the whole-prompt path and the
//! work-saving one (the frozen prefix in step-2 modes; shared prefixes in evaluation), on the
//! same rows in the same run, with the predicted cost of a run at a given budget; and
//! `collm bench rank`: one user's candidates through whole prompts and the shared prefix.
//! Behind the `bench` feature: these serve the binary's `collm bench`, not the library's API.

use crate::experiment::ExperimentConfig;
use crate::model::CoLlm;
use crate::recommend::{Recommender, User};
use crate::train::optimizer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use collm_data::{Dataset, Interaction};
use collm_llm::bench::render_op_split;
use collm_llm::ops::cpu::times::{self, OpTime};
use collm_nn::layers::bce_with_logits;
use collm_nn::optim::clip_grad_norm;
use collm_nn::TrainCtx;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::collections::HashSet;
use std::time::Instant;

/// What to measure.
pub struct TrainBenchOptions {
    /// The run's config (mode, data, backbone, CF run, step 1, batch size).
    pub config: ExperimentConfig,
    /// Timed optimizer steps per path (after `warm` untimed ones).
    pub steps: usize,
    pub warm: usize,
    /// Valid rows scored per evaluation path: the split's first rows.
    pub eval_rows: usize,
    /// Also time each fused CPU op during the timed steps of the path a run trains with
    /// (the frozen prefix where the mode has one) and during the shared-prefix evaluation.
    pub op_times: bool,
}

/// One path's training throughput.
#[derive(Debug, Clone, Serialize)]
pub struct StepRate {
    pub path: &'static str,
    pub samples_per_s: f64,
    pub seconds_per_step: f64,
    /// Hours per 1,000 optimizer steps at the config's batch size.
    pub hours_per_1000_steps: f64,
}

/// `collm bench train`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub cpu: String,
    pub mode: String,
    pub data: String,
    pub batch_size: usize,
    pub steps: usize,
    /// Mean prompt length of the measured training rows, in tokens.
    pub mean_prompt_tokens: f64,
    /// The share of those tokens before the first ID slot (the frozen prefix; 0 where the
    /// mode trains the LoRA).
    pub frozen_share: f64,
    /// The whole-prompt path first, then the frozen-prefix path where the mode has one.
    pub train: Vec<StepRate>,
    /// Frozen-prefix samples/s over whole-prompt samples/s.
    pub train_speedup: Option<f64>,
    /// The bound the token counts set for it: a step is `fwd_share` forward over all tokens
    /// and the rest backward; the frozen prefix keeps its forward and drops its backward.
    pub train_bound: Option<f64>,
    pub eval_rows: usize,
    /// Rows per distinct (prefix tokens, user) among them.
    pub eval_rows_per_prefix: f64,
    pub eval_whole_rows_per_s: f64,
    pub eval_shared_rows_per_s: f64,
    pub eval_speedup: f64,
    pub eval_max_abs_diff: f64,
    pub valid_rows: usize,
    /// Hours of one pass over the whole valid split, each path.
    pub valid_pass_hours_whole: f64,
    pub valid_pass_hours_shared: f64,
    /// With `op_times`: the training step of the path a run trains with, split by fused op
    /// (seconds per step).
    pub train_op_times: Option<Vec<OpTime>>,
    /// With `op_times`: the shared-prefix evaluation of the measured rows, split by fused op
    /// (seconds per 1,000 rows).
    pub eval_op_times: Option<Vec<OpTime>>,
}

/// The forward share of a whole-prompt training step measured by `collm bench llm` (43%
/// forward, 57% backward on SmolLM2-135M): the basis of [`TrainBench::train_bound`].
const FWD_SHARE: f64 = 0.43;

/// Seconds per timed step; with `ops`, each fused op's seconds and calls per timed step too.
fn time_steps(
    model: &CoLlm,
    cfg: &ExperimentConfig,
    batches: &[Vec<&Interaction>],
    titles: &[String],
    warm: usize,
    ops: bool,
) -> Result<(f64, Option<Vec<OpTime>>)> {
    let mut opt = optimizer(model, cfg)?;
    let vars: Vec<candle_core::Var> = opt.vars().into_iter().cloned().collect();
    let mut t0 = Instant::now();
    for (k, rows) in batches.iter().enumerate() {
        if k == warm {
            times::record(ops);
            t0 = Instant::now();
        }
        let ctx = TrainCtx::new(cfg.seed.wrapping_add(k as u64));
        let scores = model.scores(rows, titles, Some(&ctx), true)?;
        let labels: Vec<f32> = rows.iter().map(|r| r.label as f32).collect();
        let labels = Tensor::from_vec(labels, rows.len(), scores.device())?;
        let grads = bce_with_logits(&scores, &labels)?.backward()?;
        let mut acc: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        clip_grad_norm(&mut acc, cfg.training.clip_norm)?;
        opt.step_with(&acc)?;
    }
    let timed = (batches.len() - warm).max(1) as f64;
    let secs = t0.elapsed().as_secs_f64() / timed;
    Ok((secs, ops.then(|| recorded_per(timed))))
}

/// What [`times`] recorded since it was turned on, per `n` (steps, or thousands of rows); stops
/// recording.
fn recorded_per(n: f64) -> Vec<OpTime> {
    times::record(false);
    times::recorded()
        .into_iter()
        .map(|o| OpTime {
            seconds: o.seconds / n,
            calls: (o.calls as f64 / n).round() as u64,
            ..o
        })
        .collect()
}

/// Measures a config's training step and evaluation both ways (see the module docs). The
/// trained weights are restored between paths, so both start from the same state.
pub fn bench_train(o: &TrainBenchOptions) -> Result<TrainBench> {
    let cfg = &o.config;
    if !cfg.mode.trains() {
        bail!("mode '{}' trains nothing: nothing to time", cfg.mode.name());
    }
    if o.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let ds = Dataset::load(&cfg.data.path)?;
    let mut model = crate::run::build_model(cfg, &ds, &crate::train::device())?;
    let titles = &ds.titles;
    let train = &ds.train()?.rows;
    let b = cfg.training.batch_size.max(1);
    // The run's own first batches (its epoch-0 order), the same for both paths.
    let order = crate::train::epoch_order(cfg.seed, 0, train.len());
    let batches: Vec<Vec<&Interaction>> = order
        .chunks(b)
        .take(o.warm + o.steps)
        .map(|c| c.iter().map(|&k| &train[k]).collect())
        .collect();
    let measured: Vec<&Interaction> = batches[o.warm.min(batches.len() - 1)..]
        .iter()
        .flatten()
        .copied()
        .collect();
    let enc = model.encode_prompts(&measured, titles)?;
    let tokens: usize = enc.iter().map(|e| e.ids.len()).sum();
    let frozen: usize = model.frozen_prefix_ends(&enc).map_or(0, |e| e.iter().sum());
    let snapshot: Vec<(candle_core::Var, Tensor)> = model
        .trainable_stores()
        .iter()
        .flat_map(|(_, s)| s.trainable())
        .map(|(_, v)| {
            let t = v.as_tensor().copy()?;
            Ok((v, t))
        })
        .collect::<Result<_>>()?;
    let restore = |snap: &[(candle_core::Var, Tensor)]| -> Result<()> {
        for (v, t) in snap {
            v.set(t)?;
        }
        Ok(())
    };
    let rate = |path, secs: f64| StepRate {
        path,
        samples_per_s: b as f64 / secs,
        seconds_per_step: secs,
        hours_per_1000_steps: secs * 1000.0 / 3600.0,
    };
    // Ops are timed on the path a run trains with: the frozen prefix where there is one.
    model.frozen_prefix = false;
    let (secs, mut train_op_times) = time_steps(
        &model,
        cfg,
        &batches,
        titles,
        o.warm,
        o.op_times && frozen == 0,
    )?;
    let mut rates = vec![rate("whole prompts", secs)];
    restore(&snapshot)?;
    model.frozen_prefix = true;
    if frozen > 0 {
        let (secs, ops) = time_steps(&model, cfg, &batches, titles, o.warm, o.op_times)?;
        rates.push(rate("frozen prefix", secs));
        train_op_times = ops;
        restore(&snapshot)?;
    }
    let share = frozen as f64 / tokens.max(1) as f64;
    let train_speedup = rates
        .get(1)
        .map(|r| r.samples_per_s / rates[0].samples_per_s);
    let train_bound = (frozen > 0).then(|| 1.0 / (FWD_SHARE + (1.0 - FWD_SHARE) * (1.0 - share)));

    // Evaluation: the first `eval_rows` rows of the valid split (a full pass in miniature:
    // rows come sorted by user and time, so a user's rows with one history stand together),
    // both ways.
    let valid = &ds.split("valid")?.rows;
    let rows = &valid[..o.eval_rows.min(valid.len())];
    if rows.is_empty() {
        bail!("--eval-rows must be at least 1");
    }
    let prefixes: HashSet<(u32, &[u32])> =
        rows.iter().map(|r| (r.uid, r.history.as_slice())).collect();
    model.predict_shared(&rows[..rows.len().min(4)], titles, false)?;
    let t0 = Instant::now();
    let whole = model.predict(rows, titles, false)?;
    let whole_s = t0.elapsed().as_secs_f64();
    times::record(o.op_times);
    let t0 = Instant::now();
    let shared = model.predict_shared(rows, titles, false)?;
    let shared_s = t0.elapsed().as_secs_f64();
    let eval_op_times = o.op_times.then(|| recorded_per(rows.len() as f64 / 1000.0));
    let diff = whole
        .iter()
        .zip(&shared)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    let n = rows.len() as f64;
    let per_hour = |secs: f64| secs / n * valid.len() as f64 / 3600.0;
    Ok(TrainBench {
        cpu: collm_core::machine::cpu_description(),
        mode: cfg.mode.name().to_string(),
        data: cfg.data.path.display().to_string(),
        batch_size: b,
        steps: o.steps,
        mean_prompt_tokens: tokens as f64 / enc.len().max(1) as f64,
        frozen_share: share,
        train: rates,
        train_speedup,
        train_bound,
        eval_rows: rows.len(),
        eval_rows_per_prefix: n / prefixes.len().max(1) as f64,
        eval_whole_rows_per_s: n / whole_s,
        eval_shared_rows_per_s: n / shared_s,
        eval_speedup: whole_s / shared_s,
        eval_max_abs_diff: diff,
        valid_rows: valid.len(),
        valid_pass_hours_whole: per_hour(whole_s),
        valid_pass_hours_shared: per_hour(shared_s),
        train_op_times,
        eval_op_times,
    })
}

impl TrainBench {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} on {} ({}), batch {}, {} timed steps; mean prompt {:.0} tokens, {:.0}% before the first ID slot\n",
            self.mode,
            self.data,
            self.cpu,
            self.batch_size,
            self.steps,
            self.mean_prompt_tokens,
            100.0 * self.frozen_share
        );
        s.push_str("| path | samples/s | s/step | h per 1,000 steps |\n|---|---|---|---|\n");
        for r in &self.train {
            s.push_str(&format!(
                "| train, {} | {:.2} | {:.2} | {:.2} |\n",
                r.path, r.samples_per_s, r.seconds_per_step, r.hours_per_1000_steps
            ));
        }
        if let (Some(x), Some(bound)) = (self.train_speedup, self.train_bound) {
            s.push_str(&format!(
                "train speedup {x:.2}x (token-count bound {bound:.2}x)\n"
            ));
        }
        s.push_str(&format!(
            "eval of the first {} valid rows ({:.2} rows per prefix): whole prompts {:.2} rows/s, shared prefixes {:.2} rows/s, speedup {:.2}x, max |diff| {:.1e}; a full valid pass ({} rows): {:.2} h -> {:.2} h\n",
            self.eval_rows,
            self.eval_rows_per_prefix,
            self.eval_whole_rows_per_s,
            self.eval_shared_rows_per_s,
            self.eval_speedup,
            self.eval_max_abs_diff,
            self.valid_rows,
            self.valid_pass_hours_whole,
            self.valid_pass_hours_shared
        ));
        if let (Some(ops), Some(r)) = (&self.train_op_times, self.train.last()) {
            s.push_str(&render_op_split(
                &format!("train step by op ({}", r.path),
                (r.seconds_per_step, "per step"),
                ops,
                "outside the ops (prompts, CIE, graph, AdamW)",
            ));
        }
        if let Some(ops) = &self.eval_op_times {
            s.push_str(&render_op_split(
                "evaluation by op (shared prefixes",
                (1000.0 / self.eval_shared_rows_per_s, "per 1,000 rows"),
                ops,
                "outside the ops (prompts, prefix caches, CIE)",
            ));
        }
        s
    }
}

/// What `collm bench rank` measured: one user's candidates scored through whole prompts and
/// through the shared prefix, same run, same rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RankBench {
    pub user: u32,
    pub candidates: usize,
    pub full_s: f64,
    pub prefix_s: f64,
    pub speedup: f64,
    pub max_abs_diff: f64,
}

/// Liked items that fill a prompt's history (the default `history`).
const FULL_HISTORY: usize = 10;

/// Scores `candidates` items (sampled, seeded, from those the user never interacted with) for
/// one user (`user`, or else the first with enough unseen items and a full prompt history of
/// 10 liked items, else the first with enough unseen items) both ways and compares.
pub fn bench_rank(
    rec: &Recommender,
    user: Option<u64>,
    candidates: usize,
    seed: u64,
) -> Result<RankBench> {
    let user = match user {
        Some(u) => rec.user(u)?,
        None => {
            let eligible: Vec<User> = (1..=u64::from(rec.max_user()))
                .filter_map(|u| rec.user(u).ok())
                .filter(|u| rec.unseen(u).len() >= candidates)
                .collect();
            // A user with a full prompt history (10 titles, the default) is the usual case.
            let full = eligible
                .iter()
                .position(|u| u.history.len() >= FULL_HISTORY);
            match full {
                Some(k) => eligible[k].clone(),
                None => eligible
                    .into_iter()
                    .next()
                    .with_context(|| format!("no user has {candidates} unseen items"))?,
            }
        }
    };
    let mut items = rec.unseen(&user);
    items.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    items.truncate(candidates);
    let rows: Vec<Interaction> = items.iter().map(|&i| user.row(i)).collect();
    // One untimed pass of each first: lazy initialisation and allocator warm-up.
    rec.score_rows(&rows[..rows.len().min(4)], false)?;
    rec.score_rows_full(&rows[..rows.len().min(4)], false)?;
    let t = std::time::Instant::now();
    let full = rec.score_rows_full(&rows, false)?;
    let full_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let shared = rec.score_rows(&rows, false)?;
    let prefix_s = t.elapsed().as_secs_f64();
    let max_abs_diff = full
        .iter()
        .zip(&shared)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    Ok(RankBench {
        user: user.uid,
        candidates: rows.len(),
        full_s,
        prefix_s,
        speedup: full_s / prefix_s,
        max_abs_diff,
    })
}
