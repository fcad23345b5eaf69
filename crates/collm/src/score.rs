//! The scoring scheduler: how the rows to score (any users, any order) become model calls.
//! Every path that scores without gradients comes here: evaluation and validation, `collm
//! score` and `rank`, the server's worker and Python. [`CoLlm::predict_shared`] groups rows
//! whose prompts begin with the same user part (same tokens, and for a user slot the same user
//! and history), runs that part once into a KV cache and the suffixes (target title,
//! `<TargetItemID>`, answer cue) against it: `eval_batch_size` rows per model call, or more
//! while their padded tokens stay within `eval_suffix_tokens` (a suffix is a few dozen tokens,
//! too few for a product to run at speed in small batches);
//! [`CoLlm::predict`] runs whole prompts, batched by length (the reference the shared path is
//! tested against). Between two model calls a caller may stop the work ([`Until`]): the server
//! does when every client still owed rows has gone. What one model call computes is
//! [`CoLlm::scores`] and the prefix-cache passes in `model.rs`.

use crate::model::CoLlm;
use crate::prompt::Encoded;
use anyhow::Result;
use candle_core::DType;
use collm_data::Interaction;
use std::collections::HashMap;

/// Asked before each model call with the scores so far (`None`: not scored yet); `false`
/// stops the work there (the rows left unscored stay `None`).
pub type Until<'a> = &'a mut dyn FnMut(&[Option<f64>]) -> bool;

/// What makes two prompts' prefixes the same: their tokens and, when the prefix holds a user
/// slot, the user and history that fill it.
type PrefixKey<'a> = (&'a [u32], Option<(u32, &'a [u32])>);

/// Scores so far, for [`Until`].
struct Scored {
    out: Vec<Option<f64>>,
}

impl Scored {
    fn new(n: usize) -> Self {
        Self { out: vec![None; n] }
    }

    /// Whether the caller wants the next model call.
    fn go_on(&self, until: &mut dyn FnMut(&[Option<f64>]) -> bool) -> bool {
        until(&self.out)
    }
}

/// The scores of a run that nothing stopped: every row has one.
fn every_row(out: Vec<Option<f64>>) -> Vec<f64> {
    out.into_iter()
        .map(|s| s.expect("every row scored when nothing stops the work"))
        .collect()
}

impl CoLlm {
    /// Scores of many rows, in input order, without gradients, sharing prompt prefixes (see
    /// the module's documentation): equal to [`CoLlm::predict`] within rounding, and much
    /// faster when users have many candidates.
    pub fn predict_shared(
        &self,
        rows: &[Interaction],
        titles: &[String],
        progress: bool,
    ) -> Result<Vec<f64>> {
        Ok(every_row(self.predict_shared_until(
            rows,
            titles,
            progress,
            &mut |_| true,
        )?))
    }

    /// [`CoLlm::predict_shared`] that asks `until` before each model call whether to go on.
    /// A group of rows sharing one prefix is never cut across prefills: one user's
    /// candidates share one prefill however many model calls their suffixes take.
    pub fn predict_shared_until(
        &self,
        rows: &[Interaction],
        titles: &[String],
        progress: bool,
        until: Until,
    ) -> Result<Vec<Option<f64>>> {
        let refs: Vec<&Interaction> = rows.iter().collect();
        let enc = self.encode_prompts(&refs, titles)?;
        let splits: Vec<usize> = enc.iter().map(|e| self.split_point(e)).collect();
        if splits.contains(&0) {
            // A template that starts with its target part has nothing to share.
            return self.predict_until(rows, titles, progress, until);
        }
        // Groups of rows with one prefix, in order of first appearance.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut seen: HashMap<PrefixKey, usize> = HashMap::new();
        for (r, e) in enc.iter().enumerate() {
            let at = splits[r];
            let user = e
                .user_slots
                .iter()
                .any(|&p| p < at)
                .then(|| (rows[r].uid, rows[r].history.as_slice()));
            let g = *seen.entry((&e.ids[..at], user)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(r);
        }
        // Within a group, suffixes of similar length pad little; so do windows of prefixes
        // of similar length.
        for g in &mut groups {
            g.sort_by_key(|&r| enc[r].ids.len() - splits[r]);
        }
        groups.sort_by_key(|g| splits[g[0]]);
        let pb = collm_nn::scaffold::progress_bar(rows.len(), "rows", "score".into(), !progress);
        let mut scored = Scored::new(rows.len());
        // A prefix no other row shares gains nothing from a cache: such rows run whole, in
        // batches of similar length, with the last block at the read position only.
        let (groups, single): (Vec<Vec<usize>>, Vec<Vec<usize>>) =
            groups.into_iter().partition(|g| g.len() > 1);
        if !single.is_empty() {
            let alone: Vec<Interaction> = single.iter().map(|g| rows[g[0]].clone()).collect();
            let at: Vec<usize> = single.iter().map(|g| g[0]).collect();
            // Its `until` sees the whole batch's scores, those of the rows run whole filled in.
            let mut inner = |part: &[Option<f64>]| {
                for (&r, &v) in at.iter().zip(part) {
                    scored.out[r] = v;
                }
                scored.go_on(until)
            };
            let part = self.predict_until(&alone, titles, false, &mut inner)?;
            for (&r, v) in at.iter().zip(part) {
                scored.out[r] = v;
            }
            pb.inc(single.len() as u64)?;
        }
        let batch = self.config.model.eval_batch_size.max(1);
        let budget = self.config.model.eval_suffix_tokens;
        let suffix_len = |r: usize| enc[r].ids.len() - splits[r];
        // May `rows` suffixes, the longest `longest` tokens, share one model call?
        let fits = |rows: usize, longest: usize| rows <= batch || rows * longest <= budget;
        let pass = self.scoring_pass();
        let dec = &self.backbone.decoder;
        // Windows of whole groups, about one model call of suffixes each, so that the cache
        // holds at most `batch` prefixes at a time.
        let mut start = 0;
        'windows: while start < groups.len() {
            let (mut end, mut n, mut longest) = (start, 0, 0);
            while end < groups.len() && end - start < batch {
                let g = &groups[end];
                let l = g.iter().map(|&r| suffix_len(r)).fold(longest, usize::max);
                if end > start && !fits(n + g.len(), l) {
                    break;
                }
                (n, longest) = (n + g.len(), l);
                end += 1;
            }
            if !scored.go_on(until) {
                break;
            }
            let window = &groups[start..end];
            // The prefixes, user slots filled from each group's first row.
            let firsts: Vec<usize> = window.iter().map(|g| g[0]).collect();
            let prefix_enc: Vec<Encoded> = firsts
                .iter()
                .map(|&r| enc[r].split_at(splits[r]).0)
                .collect();
            let first_rows: Vec<&Interaction> = firsts.iter().map(|&r| &rows[r]).collect();
            let slots = self.slot_values(&first_rows, None)?;
            let (pe, pm) = self.embed_encoded(&prefix_enc, slots.as_ref())?;
            let cache = dec.prefill(&pe, &pm, &pass)?;
            // The suffixes, in chunks of one model call each.
            let order: Vec<(usize, usize)> = window
                .iter()
                .enumerate()
                .flat_map(|(p, g)| g.iter().map(move |&r| (p, r)))
                .collect();
            let mut chunks: Vec<&[(usize, usize)]> = Vec::new();
            let mut c0 = 0;
            while c0 < order.len() {
                let (mut c1, mut longest) = (c0, 0);
                while c1 < order.len() {
                    let l = longest.max(suffix_len(order[c1].1));
                    if c1 > c0 && !fits(c1 + 1 - c0, l) {
                        break;
                    }
                    (c1, longest) = (c1 + 1, l);
                }
                chunks.push(&order[c0..c1]);
                c0 = c1;
            }
            for (c, chunk) in chunks.into_iter().enumerate() {
                if c > 0 && !scored.go_on(until) {
                    break 'windows;
                }
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for &(p, _) in chunk {
                    match runs.last_mut() {
                        Some((q, n)) if *q == p => *n += 1,
                        _ => runs.push((p, 1)),
                    }
                }
                let suffix_enc: Vec<Encoded> = chunk
                    .iter()
                    .map(|&(_, r)| enc[r].split_at(splits[r]).1)
                    .collect();
                let chunk_rows: Vec<&Interaction> = chunk.iter().map(|&(_, r)| &rows[r]).collect();
                let slots = self.slot_values(&chunk_rows, None)?;
                let (se, sm) = self.embed_encoded(&suffix_enc, slots.as_ref())?;
                let h = dec.forward_cached(&se, &sm, &cache, &runs, &pass)?;
                let s = self
                    .score_hidden(&h, &sm.last_positions(), &pass)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                for (&(_, r), v) in chunk.iter().zip(s) {
                    scored.out[r] = Some(f64::from(v));
                }
                pb.inc(chunk.len() as u64)?;
            }
            start = end;
        }
        pb.finish_and_clear();
        Ok(scored.out)
    }

    /// Token count of each row's prompt.
    pub fn prompt_lengths(&self, rows: &[Interaction], titles: &[String]) -> Result<Vec<usize>> {
        let all: Vec<&Interaction> = rows.iter().collect();
        Ok(self
            .encode_prompts(&all, titles)?
            .iter()
            .map(|e| e.ids.len())
            .collect())
    }

    /// Scores of many rows, in input order, without gradients: whole prompts, batched by
    /// prompt length.
    pub fn predict(
        &self,
        rows: &[Interaction],
        titles: &[String],
        progress: bool,
    ) -> Result<Vec<f64>> {
        Ok(every_row(self.predict_until(
            rows,
            titles,
            progress,
            &mut |_| true,
        )?))
    }

    /// [`CoLlm::predict`] that asks `until` before each model call whether to go on.
    pub fn predict_until(
        &self,
        rows: &[Interaction],
        titles: &[String],
        progress: bool,
        until: Until,
    ) -> Result<Vec<Option<f64>>> {
        let pb = collm_nn::scaffold::progress_bar(rows.len(), "rows", "score".into(), !progress);
        // Batches of similar prompt lengths pad little; results go back to input order.
        let lens = self.prompt_lengths(rows, titles)?;
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&k| lens[k]);
        let mut scored = Scored::new(rows.len());
        for chunk in order.chunks(self.config.model.eval_batch_size.max(1)) {
            if !scored.go_on(until) {
                break;
            }
            let refs: Vec<&Interaction> = chunk.iter().map(|&k| &rows[k]).collect();
            let s = self
                .scores(&refs, titles, None, false)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for (&k, v) in chunk.iter().zip(s) {
                scored.out[k] = Some(f64::from(v));
            }
            pb.inc(chunk.len() as u64)?;
        }
        pb.finish_and_clear();
        Ok(scored.out)
    }
}
