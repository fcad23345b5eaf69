//! Recommending with a trained run (of either kind): score a user's candidates, rank them, and
//! evaluate top-K ranking on a split. CoLLM runs score through the scheduler of [`crate::score`]
//! (one prefix per user, its candidates' suffixes batched); collaborative-model runs through their
//! own forward pass. Used by `collm score`, `collm rank`, `collm bench rank` and `collm serve`.
//!
//! A user is a known id (the prompt shows their latest liked titles, the user slot holds what
//! the CF model learned for them) or a **cold user** given only a history of liked items: the
//! prompt shows that history, and the user slot holds what the CF model gives a user it has
//! never seen — SASRec and DIN build `u` from the history; MF, LightGCN and UI-token read the
//! padding row (id 0), which training never updates.

use crate::model::CoLlm;
use anyhow::{bail, Context, Result};
use collm_cf::train::predict as cf_predict;
use collm_cf::CollaborativeModel;
use collm_core::io::LineReader;
use collm_data::{Dataset, Interaction};
use collm_metrics::ranking::{rank_of, RankingReport};
use collm_metrics::{Report, RunKind};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

/// A request that names something the run does not know, or asks for nothing sensible: the
/// server answers these with 404 / 400.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown user {id}: user ids run from 1 to {max}")]
    UnknownUser { id: u64, max: u32 },
    #[error("unknown item {id}: item ids run from 1 to {max}")]
    UnknownItem { id: u64, max: u32 },
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    /// 404 for ids the run does not know, 400 for the rest.
    pub fn is_not_found(&self) -> bool {
        !matches!(self, RequestError::Invalid(_))
    }
}

enum Scorer {
    Collm(Box<CoLlm>),
    Cf {
        model: Box<dyn CollaborativeModel>,
        batch: usize,
    },
}

/// Who to recommend for: the row every candidate is scored in (uid, history), and the items
/// not to recommend again.
#[derive(Debug, Clone)]
pub struct User {
    /// 0 for a cold user.
    pub uid: u32,
    /// Liked items, oldest first.
    pub history: Vec<u32>,
    /// Items the user interacted with (any split), or the given history for a cold user.
    pub seen: HashSet<u32>,
}

impl User {
    /// The interaction row that scores `iid` for this user.
    pub fn row(&self, iid: u32) -> Interaction {
        Interaction {
            uid: self.uid,
            iid,
            label: 0,
            timestamp: 0,
            history: self.history.clone(),
        }
    }
}

/// One ranked item.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ranked {
    pub item: u32,
    pub score: f64,
    pub title: String,
}

/// A run ready to score and rank, with the dataset it was trained on.
pub struct Recommender {
    pub kind: RunKind,
    pub dataset: Dataset,
    scorer: Scorer,
    /// Per uid: latest liked history and every item interacted with, over all splits.
    users: Vec<(Vec<u32>, HashSet<u32>)>,
}

/// The dataset a collaborative-model run is used on: `data`, which it needs (a CF run does not
/// name its dataset's path, only its content's hash).
pub(crate) fn cf_data<'a>(run: &Path, data: Option<&'a Path>) -> Result<&'a Path> {
    data.ok_or_else(|| {
        collm_core::io::InputError(format!(
            "{}: a collaborative-model run needs its dataset (--data)",
            run.display()
        ))
        .into()
    })
}

impl Recommender {
    /// Opens a run directory: a CoLLM run knows its dataset (`data`, when given, is read
    /// instead and must hold the run's data, a test split possibly added); a
    /// collaborative-model run needs `data` (the same condition).
    pub fn open(run: &Path, data: Option<&Path>) -> Result<Self> {
        let kind = RunKind::of_run(run)?;
        let (dataset, scorer) = match kind {
            RunKind::Collm => {
                // `data`, when given, must hold the run's data (a test split may be added).
                let (_, ds, model) = crate::run::load_run_on(run, data)?;
                (ds, Scorer::Collm(Box::new(model)))
            }
            RunKind::Cf => {
                let ds = Dataset::load(cf_data(run, data)?)?;
                let (cfg, model) = collm_cf::run::load_model(run, &ds, &candle_core::Device::Cpu)?;
                let batch = cfg.cf.eval_batch_size;
                (ds, Scorer::Cf { model, batch })
            }
        };
        Ok(Self::new(kind, dataset, scorer))
    }

    fn new(kind: RunKind, dataset: Dataset, scorer: Scorer) -> Self {
        let mut users: Vec<(Vec<u32>, HashSet<u32>)> =
            vec![Default::default(); dataset.num_users()];
        // The latest row (by timestamp; later splits win ties) gives the current history.
        let mut latest: Vec<Option<(i64, &Interaction)>> = vec![None; dataset.num_users()];
        for split in &dataset.splits {
            for r in &split.rows {
                let u = r.uid as usize;
                users[u].1.insert(r.iid);
                if latest[u].is_none_or(|(t, _)| r.timestamp >= t) {
                    latest[u] = Some((r.timestamp, r));
                }
            }
        }
        for (u, l) in latest.iter().enumerate() {
            if let Some((_, r)) = l {
                let mut h = r.history.clone();
                if r.label == 1 {
                    h.push(r.iid);
                }
                users[u].0 = h;
            }
        }
        Self {
            kind,
            dataset,
            scorer,
            users,
        }
    }

    /// Largest user id.
    pub fn max_user(&self) -> u32 {
        self.dataset.num_users().saturating_sub(1) as u32
    }

    /// Largest item id.
    pub fn max_item(&self) -> u32 {
        self.dataset.num_items().saturating_sub(1) as u32
    }

    /// A known user, with their latest history.
    pub fn user(&self, uid: u64) -> Result<User, RequestError> {
        if uid == 0 || uid > u64::from(self.max_user()) {
            return Err(RequestError::UnknownUser {
                id: uid,
                max: self.max_user(),
            });
        }
        let (history, seen) = &self.users[uid as usize];
        Ok(User {
            uid: uid as u32,
            history: history.clone(),
            seen: seen.clone(),
        })
    }

    /// A user the run has never seen, described by liked items (oldest first).
    pub fn cold_user(&self, history: &[u64]) -> Result<User, RequestError> {
        let history = history
            .iter()
            .map(|&i| self.item(i))
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(User {
            uid: 0,
            seen: history.iter().copied().collect(),
            history,
        })
    }

    /// Checks an item id.
    pub fn item(&self, iid: u64) -> Result<u32, RequestError> {
        if iid == 0 || iid > u64::from(self.max_item()) {
            return Err(RequestError::UnknownItem {
                id: iid,
                max: self.max_item(),
            });
        }
        Ok(iid as u32)
    }

    /// The row that scores item `iid` for known user `uid` (their latest history).
    pub fn row(&self, uid: u64, iid: u64) -> Result<Interaction, RequestError> {
        if uid == 0 || uid > u64::from(self.max_user()) {
            return Err(RequestError::UnknownUser {
                id: uid,
                max: self.max_user(),
            });
        }
        Ok(Interaction {
            uid: uid as u32,
            iid: self.item(iid)?,
            label: 0,
            timestamp: 0,
            history: self.users[uid as usize].0.clone(),
        })
    }

    /// Scores (logits) of every row of a split, in its order, and their report: AUC and UAUC,
    /// overall and on the warm/cold subsets (what `collm eval` prints).
    pub fn evaluate(&self, split: &str, progress: bool) -> Result<(Vec<f64>, Report)> {
        let scores = self.score_rows(&self.dataset.split(split)?.rows, progress)?;
        let report = Report::for_split(&self.dataset, split, &scores)?;
        Ok((scores, report))
    }

    /// Items the user has not interacted with, in id order.
    pub fn unseen(&self, user: &User) -> Vec<u32> {
        (1..=self.max_item())
            .filter(|i| !user.seen.contains(i))
            .collect()
    }

    /// Scores of rows (any users, any order), in their order: logits (P(Yes) = sigmoid).
    /// CoLLM runs score through the scheduler of [`crate::score`] (one prefill per user).
    pub fn score_rows(&self, rows: &[Interaction], progress: bool) -> Result<Vec<f64>> {
        match &self.scorer {
            Scorer::Collm(m) => m.predict_shared(rows, &self.dataset.titles, progress),
            Scorer::Cf { model, batch } => {
                cf_predict(model.as_ref(), rows, *batch, &candle_core::Device::Cpu)
            }
        }
    }

    /// [`Recommender::score_rows`] that asks `until` before each model call whether to go on
    /// (see [`crate::score::Until`]); rows left unscored are `None`. A collaborative model
    /// scores all rows in one call.
    pub fn score_rows_until(
        &self,
        rows: &[Interaction],
        until: crate::score::Until,
    ) -> Result<Vec<Option<f64>>> {
        match &self.scorer {
            Scorer::Collm(m) => m.predict_shared_until(rows, &self.dataset.titles, false, until),
            Scorer::Cf { .. } => Ok(self
                .score_rows(rows, false)?
                .into_iter()
                .map(Some)
                .collect()),
        }
    }

    /// The same scores through whole prompts (no prefix sharing, [`CoLlm::predict`]): the
    /// reference `collm bench rank` and the tests compare the shared path with (evaluation and
    /// validation score through [`Recommender::score_rows`]'s scheduler too). Collaborative-model
    /// runs score as in `score_rows`.
    pub fn score_rows_full(&self, rows: &[Interaction], progress: bool) -> Result<Vec<f64>> {
        match &self.scorer {
            Scorer::Collm(m) => m.predict(rows, &self.dataset.titles, progress),
            Scorer::Cf { .. } => self.score_rows(rows, progress),
        }
    }

    /// Scores of `items` for `user`, in the order given.
    pub fn score(&self, user: &User, items: &[u32]) -> Result<Vec<f64>> {
        let rows: Vec<Interaction> = items.iter().map(|&i| user.row(i)).collect();
        self.score_rows(&rows, false)
    }

    /// The `k` best of `candidates` (default: every item the user has not interacted with),
    /// best first; ties in id order.
    pub fn rank(
        &self,
        user: &User,
        k: usize,
        candidates: Option<&[u32]>,
        progress: bool,
    ) -> Result<Vec<Ranked>> {
        let items = match candidates {
            Some(c) => c.to_vec(),
            None => self.unseen(user),
        };
        let rows: Vec<Interaction> = items.iter().map(|&i| user.row(i)).collect();
        let scores = self.score_rows(&rows, progress)?;
        Ok(self.top(&items, &scores, k))
    }

    /// The `k` best of `items` by `scores`, best first; ties in id order.
    pub fn top(&self, items: &[u32], scores: &[f64], k: usize) -> Vec<Ranked> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| {
            scores[b]
                .total_cmp(&scores[a])
                .then(items[a].cmp(&items[b]))
        });
        order
            .into_iter()
            .take(k)
            .map(|j| Ranked {
                item: items[j],
                score: scores[j],
                title: self.dataset.title(items[j]).to_string(),
            })
            .collect()
    }

    /// Top-K ranking on a split: every positive row of `split` is a case — its item against
    /// `candidates - 1` items sampled (seeded) from those its user never interacted with, all
    /// scored in the row's own context (its user and history at that time). Returns the
    /// report and, per case, the ranked candidates as TSV lines
    /// (`uid  positive  rank  iid  score  title`).
    pub fn evaluate_ranking(
        &self,
        split: &str,
        candidates: usize,
        k: usize,
        seed: u64,
        progress: bool,
    ) -> Result<(RankingReport, String)> {
        if candidates < 2 || k == 0 {
            bail!("--candidates must be at least 2 and --k at least 1");
        }
        if k >= candidates {
            bail!(
                "--k {k} is not below --candidates {candidates}: every positive would be in the top {k} (HR@{k} = 1 by construction); use a k below the number of candidates"
            );
        }
        let positives: Vec<&Interaction> = self
            .dataset
            .split(split)?
            .rows
            .iter()
            .filter(|r| r.label == 1)
            .collect();
        if positives.is_empty() {
            bail!("split '{split}' has no positive row to rank");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(positives.len());
        for p in &positives {
            let seen = &self.users[p.uid as usize].1;
            let mut pool: Vec<u32> = (1..=self.max_item())
                .filter(|i| !seen.contains(i))
                .collect();
            pool.shuffle(&mut rng);
            pool.truncate(candidates - 1);
            pool.sort_unstable();
            let start = rows.len();
            rows.push((*p).clone());
            rows.extend(pool.iter().map(|&i| Interaction {
                iid: i,
                label: 0,
                ..(*p).clone()
            }));
            spans.push(start..rows.len());
        }
        let scores = self.score_rows(&rows, progress)?;
        let mut cases = Vec::with_capacity(spans.len());
        let mut lists = String::from("uid\tpositive\trank\tiid\tscore\ttitle\n");
        for span in spans {
            let pos = &rows[span.start];
            let s = &scores[span.clone()];
            let r = rank_of(s[0], &s[1..]);
            cases.push((pos.uid, r, span.len()));
            let items: Vec<u32> = rows[span.clone()].iter().map(|x| x.iid).collect();
            // The positive listed at its own rank (ties against it, as the metric counts).
            let mut ranked = self.top(&items[1..], &s[1..], items.len());
            ranked.insert(
                r - 1,
                Ranked {
                    item: pos.iid,
                    score: s[0],
                    title: self.dataset.title(pos.iid).to_string(),
                },
            );
            for (j, x) in ranked.iter().enumerate() {
                writeln!(
                    lists,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    pos.uid,
                    pos.iid,
                    j + 1,
                    x.item,
                    x.score,
                    x.title
                )?;
            }
        }
        Ok((RankingReport::new(&cases, candidates, k), lists))
    }
}

/// Reads `uid iid` pairs (tab- or space-separated, one per line; an optional header line
/// `uid iid`; `#` comments and blank lines skipped), checking every id against the run. A known
/// user's pair gets the user's latest history (every split's positives, what serving sees).
pub fn read_pairs(path: &Path, rec: &Recommender) -> Result<Vec<Interaction>> {
    read_pairs_in(path, rec, None)
}

/// [`read_pairs`]; with `split`, each pair takes the history of its own row in that split
/// (the context `collm eval` scores it in), and a pair that is not a row of the split is an
/// error naming its line.
pub fn read_pairs_in(
    path: &Path,
    rec: &Recommender,
    split: Option<&str>,
) -> Result<Vec<Interaction>> {
    let context: Option<std::collections::HashMap<(u32, u32), &Interaction>> = match split {
        Some(name) => {
            let mut m = std::collections::HashMap::new();
            for r in &rec.dataset.split(name)?.rows {
                m.entry((r.uid, r.iid)).or_insert(r);
            }
            Some(m)
        }
        None => None,
    };
    let mut reader = LineReader::open(path)?;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while let Some(line) = reader.next_str(&mut buf)? {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if reader.line_no() == 1 && f.first().is_some_and(|x| x.eq_ignore_ascii_case("uid")) {
            continue;
        }
        if f.len() != 2 {
            return Err(reader.error(format!("expected 2 fields `uid iid`, found {}", f.len())));
        }
        let id = |name: &str, s: &str| -> Result<u64> {
            s.parse::<u64>()
                .map_err(|_| reader.error(format!("field '{name}' is not an id: {s:?}")))
        };
        let (u, i) = (id("uid", f[0])?, id("iid", f[1])?);
        let row = rec.row(u, i).map_err(|e| reader.error(e))?;
        match (&context, split) {
            (Some(ctx), Some(name)) => match ctx.get(&(row.uid, row.iid)) {
                Some(r) => out.push(Interaction {
                    label: 0,
                    ..(*r).clone()
                }),
                None => {
                    return Err(reader.error(format!(
                        "({u}, {i}) is not a row of split '{name}' (--split scores a split's own pairs)"
                    )))
                }
            },
            _ => out.push(row),
        }
    }
    if out.is_empty() {
        bail!("{}: no `uid iid` pair found", path.display());
    }
    Ok(out)
}

/// `collm score`: scores a file of `uid iid` pairs and writes `uid iid score prob` lines
/// (score = the logit, prob = its sigmoid), in the input's order, atomically. A known user's
/// pairs are scored with the user's latest history (every split's positives, as serving does);
/// with `split`, each pair in its own row's context in that split, as `collm eval` does.
pub fn score_file(
    rec: &Recommender,
    input: &Path,
    out: &Path,
    split: Option<&str>,
    progress: bool,
) -> Result<usize> {
    let rows = read_pairs_in(input, rec, split)?;
    let scores = rec
        .score_rows(&rows, progress)
        .with_context(|| format!("scoring {}", input.display()))?;
    let mut text = String::from("uid\tiid\tscore\tprob\n");
    for (r, s) in rows.iter().zip(&scores) {
        writeln!(
            text,
            "{}\t{}\t{s}\t{}",
            r.uid,
            r.iid,
            1.0 / (1.0 + (-s).exp())
        )?;
    }
    collm_core::io::write_file_atomic(out, text.as_bytes())?;
    Ok(rows.len())
}
