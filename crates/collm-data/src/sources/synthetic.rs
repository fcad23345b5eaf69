//! A seeded generator of small datasets on which CoLLM's claim is visible.
//!
//! Every label logit adds up
//! - a **semantic** part that the titles reveal: each item belongs to a genre that its title
//!   spells out with words a language model knows ("Haunted Curse" is horror, "Galaxy Robot"
//!   science fiction). Genres differ in appeal (some are liked by most users, some by few), and
//!   each user has a personal taste per genre on top. A text model reads the genre from the
//!   target's title (and the taste from the liked history) — also for items it never saw;
//! - a **collaborative** part: latent user and item factors whose dot product moves the label
//!   but that no text reveals. Only a model of ids can learn it, and only for users and items
//!   seen in training.
//!
//! Items are released over time and users join over time, so valid/test hold new items and
//! users (cold rows) on which only the text helps, next to warm rows on which the ids add
//! information the text lacks. Text-only and id-only models each capture part of the signal;
//! a hybrid should beat both. The defaults are sized for `collm quickstart` on a 2-core CPU:
//! few items with many rows each (so MF learns them), short titles (so prompts are short).

use crate::dataset::{PreparedData, SourceInfo};
use crate::history::{build_splits, RawRow, SplitTag};
use anyhow::{bail, Result};
use rand::distributions::WeightedIndex;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Normal, Poisson};
use serde::{Deserialize, Serialize};

/// Genres and the title words that make each one recognisable.
pub const GENRES: [(&str, [&str; 8]); 8] = [
    (
        "horror",
        [
            "Haunted",
            "Zombie",
            "Nightmare",
            "Curse",
            "Ghost",
            "Blood",
            "Demon",
            "Graveyard",
        ],
    ),
    (
        "romance",
        [
            "Love",
            "Kiss",
            "Wedding",
            "Heart",
            "Valentine",
            "Romance",
            "Bride",
            "Sweetheart",
        ],
    ),
    (
        "comedy",
        [
            "Crazy", "Laugh", "Silly", "Party", "Prank", "Clown", "Goofy", "Joke",
        ],
    ),
    (
        "science fiction",
        [
            "Galaxy", "Robot", "Alien", "Starship", "Planet", "Cyborg", "Laser", "Orbit",
        ],
    ),
    (
        "western",
        [
            "Cowboy", "Sheriff", "Outlaw", "Frontier", "Saloon", "Rodeo", "Canyon", "Ranch",
        ],
    ),
    (
        "war",
        [
            "Battle", "Soldier", "Trench", "Invasion", "Sniper", "Regiment", "Bomber", "Siege",
        ],
    ),
    (
        "animation",
        [
            "Puppy", "Bunny", "Fairy", "Toy", "Princess", "Dragon", "Kitten", "Magic",
        ],
    ),
    (
        "documentary",
        [
            "History", "Nature", "Ocean", "Truth", "Wildlife", "Science", "Journey", "Earth",
        ],
    ),
];

/// Generator settings; all of them are recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyntheticOptions {
    pub users: usize,
    pub items: usize,
    /// Mean number of interactions per user.
    pub rows_per_user: f64,
    /// Dimension of the latent (collaborative) factors.
    pub factors: usize,
    /// Words of each genre's list used in titles (2..=8). A title is two different words of its
    /// genre, so fewer words make titles of one genre share words more often (easier to read)
    /// and cap the catalogue at 8 * w * (w - 1) items.
    pub title_words: usize,
    /// Weight of the genres' appeal (from +1 for the first genre to -1 for the last).
    pub semantic_weight: f64,
    /// Weight of each user's personal taste per genre (standard normal).
    pub taste_weight: f64,
    /// Weight of the collaborative part of the label logit.
    pub collaborative_weight: f64,
    /// Share of the time line that is train, then valid; the rest is test.
    pub train_until: f64,
    pub valid_until: f64,
    pub seed: u64,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        Self {
            users: 160,
            items: 48,
            rows_per_user: 40.0,
            factors: 4,
            title_words: 4,
            semantic_weight: 3.0,
            taste_weight: 0.5,
            collaborative_weight: 1.5,
            train_until: 0.7,
            valid_until: 0.85,
            seed: 2023,
        }
    }
}

/// 2020-01-01T00:00:00Z: the synthetic time line runs 600 days from here.
const START: i64 = 1_577_836_800;
const SPAN_SECONDS: f64 = 600.0 * 86_400.0;

pub fn prepare(opts: &SyntheticOptions) -> Result<PreparedData> {
    if opts.users == 0 || opts.items == 0 {
        bail!("synthetic: --users and --items must be at least 1");
    }
    if !(2..=8).contains(&opts.title_words) {
        bail!("synthetic: --title-words must be in 2..=8");
    }
    let max_items = GENRES.len() * opts.title_words * (opts.title_words - 1);
    if opts.items > max_items {
        bail!(
            "synthetic: at most {max_items} items with --title-words {}",
            opts.title_words
        );
    }
    use collm_core::fields::{check, End};
    let ctx = |r: Result<()>| r.map_err(|e| anyhow::anyhow!("synthetic: {e}"));
    ctx(check(
        "rows_per_user",
        opts.rows_per_user,
        End::Open(0.0),
        End::Closed(1e6),
    ))?;
    for (name, w) in [
        ("semantic_weight", opts.semantic_weight),
        ("taste_weight", opts.taste_weight),
        ("collaborative_weight", opts.collaborative_weight),
    ] {
        ctx(check(name, w, End::Closed(0.0), End::Closed(1e3)))?;
    }
    if opts.semantic_weight + opts.taste_weight + opts.collaborative_weight == 0.0 {
        bail!("synthetic: semantic_weight, taste_weight and collaborative_weight are all 0 (the labels would carry no signal)");
    }
    ctx(check(
        "train_until",
        opts.train_until,
        End::Open(0.0),
        End::Open(1.0),
    ))?;
    ctx(check(
        "valid_until",
        opts.valid_until,
        End::Open(0.0),
        End::Open(1.0),
    ))?;
    if opts.train_until >= opts.valid_until {
        bail!("synthetic: need train_until < valid_until");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let f = opts.factors.max(1);
    // u, v ~ N(0, f^-1/2 I): the dot product has unit variance.
    let normal = Normal::new(0.0, 1.0 / (f as f64).sqrt().sqrt()).expect("valid normal");

    // Items: genre, title, latent factors, popularity, release time.
    let mut titles = vec![String::new()];
    let mut genre = vec![0usize];
    let mut item_vec = vec![vec![0.0; f]];
    let mut popularity = vec![0.0];
    let mut release = vec![0.0];
    let mut used = std::collections::HashSet::new();
    for i in 1..=opts.items {
        let g = (i - 1) % GENRES.len();
        let words = &GENRES[g].1[..opts.title_words];
        let title = loop {
            let a = words[rng.gen_range(0..words.len())];
            let b = words[rng.gen_range(0..words.len())];
            // Short titles keep prompts short (the LLM's cost grows with their length).
            let t = format!("{a} {b}");
            if a != b && used.insert(t.clone()) {
                break t;
            }
        };
        titles.push(title);
        genre.push(g);
        item_vec.push((0..f).map(|_| normal.sample(&mut rng)).collect());
        popularity.push(1.0 / (1.0 + rng.gen::<f64>() * 9.0));
        // 55% of the catalogue exists from the start; the rest is released over time.
        release.push(if rng.gen::<f64>() < 0.55 {
            0.0
        } else {
            rng.gen::<f64>() * 0.95
        });
    }

    let poisson = Poisson::new(opts.rows_per_user).expect("valid rate");
    let mut rows = Vec::new();
    let mut positives = 0usize;
    let appeal = |g: usize| 1.0 - 2.0 * g as f64 / (GENRES.len() - 1) as f64;
    let std_normal = Normal::new(0.0, 1.0).expect("valid normal");
    for uid in 1..=opts.users as u32 {
        let taste: Vec<f64> = (0..GENRES.len())
            .map(|_| std_normal.sample(&mut rng))
            .collect();
        let u: Vec<f64> = (0..f).map(|_| normal.sample(&mut rng)).collect();
        // 75% of users are active from the start; the rest join later.
        let join = if rng.gen::<f64>() < 0.75 {
            0.0
        } else {
            rng.gen::<f64>() * 0.9
        };
        let n = (poisson.sample(&mut rng) as usize).max(2);
        let mut times: Vec<f64> = (0..n)
            .map(|_| join + rng.gen::<f64>() * (1.0 - join))
            .collect();
        times.sort_by(f64::total_cmp);
        let mut seen = std::collections::HashSet::new();
        for t in times {
            let weights: Vec<f64> = (0..=opts.items)
                .map(|i| {
                    if i == 0 || release[i] > t || seen.contains(&i) {
                        0.0
                    } else {
                        popularity[i]
                    }
                })
                .collect();
            let Ok(dist) = WeightedIndex::new(&weights) else {
                break;
            };
            let i = dist.sample(&mut rng);
            seen.insert(i);
            let collaborative: f64 = u.iter().zip(&item_vec[i]).map(|(a, b)| a * b).sum();
            let logit = opts.semantic_weight * appeal(genre[i])
                + opts.taste_weight * taste[genre[i]]
                + opts.collaborative_weight * collaborative;
            let p = 1.0 / (1.0 + (-logit).exp());
            let label = u8::from(rng.gen::<f64>() < p);
            positives += label as usize;
            let split = if t < opts.train_until {
                SplitTag::Train
            } else if t < opts.valid_until {
                SplitTag::Valid
            } else {
                SplitTag::Test
            };
            rows.push(RawRow {
                uid,
                iid: i as u32,
                label,
                timestamp: START + (t * SPAN_SECONDS) as i64,
                split,
            });
        }
    }
    let mut params = std::collections::BTreeMap::new();
    params.insert("options".into(), serde_json::to_value(opts)?);
    params.insert("rows".into(), rows.len().into());
    params.insert("positives".into(), positives.into());
    let genres: Vec<&str> = GENRES.iter().map(|g| g.0).collect();
    params.insert("genres".into(), serde_json::to_value(genres)?);
    Ok(PreparedData {
        name: "synthetic".into(),
        item_noun: "movie".into(),
        source: SourceInfo {
            kind: "synthetic".into(),
            files: Vec::new(),
            params,
        },
        rule: format!(
            "Synthetic (seed {}): label ~ Bernoulli(sigmoid({} * appeal(genre) + {} * taste(user, genre) \
+ {} * <u, v>)), appeal from +1 (first genre) to -1 (last), taste ~ N(0, 1), genres spelled out by \
the title words, u/v latent factors seen by no text; users join and items are released over time; \
split by time at {} / {} of the time line; history = the user's earlier positive items across splits.",
            opts.seed,
            opts.semantic_weight,
            opts.taste_weight,
            opts.collaborative_weight,
            opts.train_until,
            opts.valid_until
        ),
        splits: build_splits(rows, true),
        titles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let small = SyntheticOptions {
            users: 30,
            items: 40,
            ..Default::default()
        };
        let a = prepare(&small).unwrap();
        let b = prepare(&small).unwrap();
        let c = prepare(&SyntheticOptions { seed: 7, ..small }).unwrap();
        assert_eq!(a.splits[0].rows, b.splits[0].rows);
        assert_eq!(a.titles, b.titles);
        assert_ne!(a.splits[0].rows, c.splits[0].rows);
    }

    #[test]
    fn titles_spell_out_the_genre() {
        let d = prepare(&SyntheticOptions {
            users: 5,
            items: 16,
            ..Default::default()
        })
        .unwrap();
        for (i, t) in d.titles.iter().enumerate().skip(1) {
            let words = &GENRES[(i - 1) % GENRES.len()].1;
            assert!(words.iter().any(|w| t.contains(w)), "{t}");
        }
    }

    #[test]
    fn appealing_genres_are_liked_more_and_titles_use_the_chosen_words() {
        let opts = SyntheticOptions {
            users: 400,
            title_words: 3,
            ..Default::default()
        };
        let d = prepare(&opts).unwrap();
        for (i, t) in d.titles.iter().enumerate().skip(1) {
            let words = &GENRES[(i - 1) % GENRES.len()].1[..3];
            let parts: Vec<&str> = t.split(' ').collect();
            assert_eq!(parts.len(), 2, "{t}");
            assert!(parts.iter().all(|p| words.contains(p)), "{t}");
        }
        // Positive rate per genre: the first (appeal +1) well above the last (appeal -1).
        let mut pos = [0usize; 8];
        let mut all = [0usize; 8];
        for split in &d.splits {
            for r in &split.rows {
                let g = (r.iid as usize - 1) % GENRES.len();
                all[g] += 1;
                pos[g] += r.label as usize;
            }
        }
        let rate = |g: usize| pos[g] as f64 / all[g] as f64;
        assert!(rate(0) > 0.7 && rate(7) < 0.3, "{pos:?} / {all:?}");
        // Too many items for the title words is an error that names the flag.
        let Err(e) = prepare(&SyntheticOptions {
            items: 8 * 3 * 2 + 1,
            title_words: 3,
            ..Default::default()
        }) else {
            panic!("49 items with 3 title words must be refused");
        };
        assert!(e.to_string().contains("--title-words 3"), "{e}");
    }
}
