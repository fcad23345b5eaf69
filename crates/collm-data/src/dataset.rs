//! The dataset directory: the stable on-disk interface between `collm data prepare` and every
//! later stage (and outside scripts).
//!
//! ```text
//! DIR/
//!   dataset.json   manifest: counts, id ranges, source files with SHA-256, the rule used
//!   train.tsv      uid  iid  label  timestamp  history      (header line, tab-separated)
//!   valid.tsv      same columns
//!   test.tsv       same columns (optional)
//!   items.tsv      iid  title
//! ```
//! Ids are 1-based (0 is the padding id and never appears in a row). `history` is the
//! comma-separated list of the user's earlier positive items, oldest first, possibly empty.
//! Rows are sorted by (uid, timestamp). The split TSVs use the same format as the
//! `collm-tsv` source, so a prepared directory is itself a valid `collm-tsv` input.

use anyhow::{bail, Context, Result};
use collm_core::io::{sha256_file, write_file_atomic, AtomicDir, LineReader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "dataset.json";
pub const ITEMS_FILE: &str = "items.tsv";
pub const SPLIT_HEADER: &str = "uid\tiid\tlabel\ttimestamp\thistory";
pub const ITEMS_HEADER: &str = "iid\ttitle";
/// The split names a dataset may hold, in their canonical order.
pub const SPLIT_NAMES: [&str; 3] = ["train", "valid", "test"];
pub const FORMAT_VERSION: u32 = 1;

/// One interaction row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interaction {
    pub uid: u32,
    pub iid: u32,
    /// 1 = liked (the positive class), 0 = not liked.
    pub label: u8,
    /// Unix seconds.
    pub timestamp: i64,
    /// The user's earlier positive items, oldest first.
    pub history: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    pub rows: Vec<Interaction>,
}

/// Counts of one split as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub file: String,
    pub rows: usize,
    pub users: usize,
    pub items: usize,
    pub positives: usize,
    pub sha256: String,
    /// Earliest and latest timestamp in the split.
    pub time_range: Option<[i64; 2]>,
}

/// A source file a dataset was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    /// `ml-1m`, `amazon-book`, `collm-tsv` or `synthetic`.
    pub kind: String,
    pub files: Vec<SourceFile>,
    /// Source-specific parameters and counts (generator settings, rows dropped, …).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// `dataset.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    /// What an item is, in prompts: `movie`, `book`, … (singular).
    pub item_noun: String,
    pub created_by: String,
    pub source: SourceInfo,
    /// The rule that produced the splits, in words.
    pub rule: String,
    pub splits: BTreeMap<String, SplitInfo>,
    /// Largest user id + 1: counts the padding id 0, as the paper's Table 1 and the reference
    /// code's embedding tables do.
    pub num_users: usize,
    /// Largest item id + 1 (items.tsv and all splits), padding id 0 included.
    pub num_items: usize,
    pub uid_range: [u32; 2],
    pub iid_range: [u32; 2],
    /// SHA-256 over the SHA-256s of items.tsv and the split files: identifies the data a model
    /// was trained on.
    pub content_sha256: String,
    /// SHA-256 of items.tsv (absent in manifests written before it was recorded: those are
    /// checked through `content_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items_sha256: Option<String>,
}

impl Manifest {
    /// The SHA-256 of each file the content hash covers: `items` (items.tsv) and each split by
    /// name. What a run records of its data, so that it can later be evaluated on the same data
    /// with splits added. `None` for manifests written before items.tsv's hash was recorded.
    pub fn file_hashes(&self) -> Option<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        out.insert("items".to_string(), self.items_sha256.clone()?);
        for (name, info) in &self.splits {
            out.insert(name.clone(), info.sha256.clone());
        }
        Some(out)
    }

    /// [`Manifest::file_hashes`] of the files training reads: items.tsv, train and valid (the
    /// test split, when there is one, may be replaced or added later).
    pub fn trained_file_hashes(&self) -> Option<BTreeMap<String, String>> {
        let mut h = self.file_hashes()?;
        h.retain(|k, _| matches!(k.as_str(), "items" | "train" | "valid"));
        Some(h)
    }
}

/// The content hash over items.tsv's hash and the given splits' hashes (in
/// [`SPLIT_NAMES`] order), as [`write_dataset`] computes it for all of a dataset's splits.
fn content_hash<'a>(items_sha: &str, splits: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut content = Sha256::new();
    content.update(items_sha.as_bytes());
    for name in SPLIT_NAMES {
        if let Some(sha) = splits(name) {
            content.update(name.as_bytes());
            content.update(sha.as_bytes());
        }
    }
    hex::encode(content.finalize())
}

/// What a run recorded of the dataset it was trained on.
#[derive(Debug, Clone, Copy)]
pub struct TrainedOn<'a> {
    pub content_sha256: &'a str,
    /// Per file ([`Manifest::file_hashes`]); `None` in runs written before it was recorded.
    pub files: Option<&'a BTreeMap<String, String>>,
    /// (num_users, num_items) the models were built with, where recorded.
    pub sizes: Option<(usize, usize)>,
}

/// A dataset in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub manifest: Manifest,
    pub splits: Vec<Split>,
    /// `titles[iid]`; index 0 is the empty padding title.
    pub titles: Vec<String>,
    /// The directory it was read from, if any.
    pub dir: Option<PathBuf>,
}

impl Dataset {
    pub fn split(&self, name: &str) -> Result<&Split> {
        self.splits.iter().find(|s| s.name == name).ok_or_else(|| {
            let have: Vec<_> = self.splits.iter().map(|s| s.name.as_str()).collect();
            collm_core::io::InputError(format!(
                "dataset {}: no split named '{name}' (it has: {})",
                self.display_name(),
                have.join(", ")
            ))
            .into()
        })
    }

    pub fn train(&self) -> Result<&Split> {
        self.split("train")
    }

    pub fn display_name(&self) -> String {
        match &self.dir {
            Some(d) => d.display().to_string(),
            None => self.manifest.name.clone(),
        }
    }

    pub fn num_users(&self) -> usize {
        self.manifest.num_users
    }

    pub fn num_items(&self) -> usize {
        self.manifest.num_items
    }

    pub fn title(&self, iid: u32) -> &str {
        self.titles
            .get(iid as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Errors unless this dataset holds the data a run was trained on (`what` names the run):
    /// the same content, or the same items and train split with splits added or replaced
    /// (say, the held-out test split added after training). A split the run recorded that
    /// differs here, or one it trained on that is missing, is named. Runs that recorded no
    /// per-file hashes match the same content, or this dataset without some of its splits.
    /// The ids must stay within the sizes the run's models were built with.
    pub fn check_trained_on(&self, run: &TrainedOn, what: &str) -> Result<()> {
        let short = |s: &str| s[..12.min(s.len())].to_string();
        let mine = &self.manifest;
        let sizes_ok = |(u, i): (usize, usize)| -> Result<()> {
            if mine.num_users > u || mine.num_items > i {
                bail!(
                    "{what} was trained on {u} user ids and {i} item ids (padding included), but {} holds {} and {}: its added splits bring ids the run's models have no embedding for",
                    self.display_name(),
                    mine.num_users,
                    mine.num_items
                );
            }
            Ok(())
        };
        if mine.content_sha256 == run.content_sha256 {
            return Ok(());
        }
        let differs = || {
            anyhow::anyhow!(
                "{what} was trained on other data (content sha256 {}) than {} holds (content sha256 {}): evaluate it on the data it was trained on",
                short(run.content_sha256),
                self.display_name(),
                short(&mine.content_sha256)
            )
        };
        let have = mine.file_hashes();
        match (run.files, &have) {
            (Some(want), Some(have)) => {
                for (file, sha) in want {
                    match have.get(file) {
                        Some(h) if h == sha => {}
                        Some(h) => bail!(
                            "{what} was trained on other data: {} of {} differs (sha256 {}, recorded {}){}",
                            if file == "items" {
                                "items.tsv".to_string()
                            } else {
                                format!("the '{file}' split")
                            },
                            self.display_name(),
                            short(h),
                            short(sha),
                            if file == "items" || file == "train" {
                                ""
                            } else {
                                "; only splits the run never read may differ or be added"
                            }
                        ),
                        None => bail!(
                            "{what} was trained on other data: {} has no '{file}' split, which the run read",
                            self.display_name()
                        ),
                    }
                }
            }
            (None, Some(have)) => {
                // An older run: the same content as some of this dataset's splits (train among
                // them), items included.
                let names: Vec<&str> = SPLIT_NAMES
                    .iter()
                    .copied()
                    .filter(|n| have.contains_key(*n))
                    .collect();
                let found = (0u32..1 << names.len()).any(|keep| {
                    let kept = |n: &str| {
                        names
                            .iter()
                            .position(|x| *x == n)
                            .filter(|&k| keep >> k & 1 == 1)
                            .and_then(|_| have.get(n).map(String::as_str))
                    };
                    kept("train").is_some()
                        && content_hash(&have["items"], kept) == run.content_sha256
                });
                if !found {
                    return Err(differs());
                }
            }
            _ => return Err(differs()),
        }
        match run.sizes {
            Some(s) => sizes_ok(s),
            None => Ok(()),
        }
    }

    /// Reads a dataset directory written by [`write_dataset`], checking the files against the
    /// manifest's hashes so that edited or swapped files are caught.
    pub fn load(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&mpath).with_context(|| {
            format!(
                "{}: cannot read the manifest (is {} a dataset directory made by `collm data prepare`?)",
                mpath.display(),
                dir.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid dataset manifest", mpath.display()))?;
        if manifest.format != "collm-dataset" || manifest.format_version != FORMAT_VERSION {
            bail!(
                "{}: format '{}' version {} is not supported (expected collm-dataset version {FORMAT_VERSION})",
                mpath.display(),
                manifest.format,
                manifest.format_version
            );
        }
        let items_path = dir.join(ITEMS_FILE);
        let items_sha = sha256_file(&items_path)?;
        if let Some(want) = &manifest.items_sha256 {
            if &items_sha != want {
                bail!(
                    "{}: contents changed since the dataset was prepared (sha256 {items_sha}, manifest says {want})",
                    items_path.display()
                );
            }
        }
        // Every file is covered: the content hash is rebuilt from the files' own hashes.
        let content = content_hash(&items_sha, |n| {
            manifest.splits.get(n).map(|i| i.sha256.as_str())
        });
        if content != manifest.content_sha256 {
            bail!(
                "{}: content sha256 {} does not match the files (items.tsv or a split's recorded hash changed since the dataset was prepared; prepare it again)",
                mpath.display(),
                manifest.content_sha256
            );
        }
        let titles = read_items_tsv(&items_path)?;
        let mut splits = Vec::new();
        for name in SPLIT_NAMES {
            let Some(info) = manifest.splits.get(name) else {
                continue;
            };
            let path = dir.join(&info.file);
            let got = sha256_file(&path)?;
            if got != info.sha256 {
                bail!(
                    "{}: contents changed since the dataset was prepared (sha256 {got}, manifest says {})",
                    path.display(),
                    info.sha256
                );
            }
            let rows = read_split_tsv(&path)?;
            if rows.len() != info.rows {
                bail!(
                    "{}: {} rows, but the manifest says {}",
                    path.display(),
                    rows.len(),
                    info.rows
                );
            }
            splits.push(Split {
                name: name.to_string(),
                rows,
            });
        }
        Ok(Self {
            manifest,
            splits,
            titles,
            dir: Some(dir.to_path_buf()),
        })
    }
}

/// Parses a split TSV (`uid iid label timestamp history`, header line first).
pub fn read_split_tsv(path: &Path) -> Result<Vec<Interaction>> {
    let mut r = LineReader::open(path)?;
    let mut buf = Vec::new();
    match r.next_str(&mut buf)? {
        None => bail!(
            "{}: empty file: expected the header line '{}'",
            path.display(),
            SPLIT_HEADER.replace('\t', "<TAB>")
        ),
        Some(h) if h == SPLIT_HEADER => {}
        Some(h) => {
            let h = h.to_string();
            return Err(r.error(format!(
                "bad header '{h}': expected '{}' (tab-separated)",
                SPLIT_HEADER.replace('\t', "<TAB>")
            )));
        }
    }
    let mut rows = Vec::new();
    while let Some(line) = r.next_str(&mut buf)? {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 {
            let e = format!(
                "expected 5 tab-separated fields (uid, iid, label, timestamp, history), found {}",
                f.len()
            );
            return Err(r.error(e));
        }
        let uid = parse_id(f[0], "uid").map_err(|e| r.error(e))?;
        let iid = parse_id(f[1], "iid").map_err(|e| r.error(e))?;
        let label = match f[2] {
            "0" => 0,
            "1" => 1,
            other => return Err(r.error(format!("field 'label' is '{other}': expected 0 or 1"))),
        };
        let timestamp: i64 = f[3].parse().map_err(|_| {
            r.error(format!(
                "field 'timestamp' is '{}': expected an integer (Unix seconds)",
                f[3]
            ))
        })?;
        let history = if f[4].is_empty() {
            Vec::new()
        } else {
            f[4].split(',')
                .map(|s| parse_id(s, "history"))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| r.error(e))?
        };
        rows.push(Interaction {
            uid,
            iid,
            label,
            timestamp,
            history,
        });
    }
    Ok(rows)
}

/// The largest id a dataset file may hold: tables are indexed by id (titles, embeddings), so
/// a hostile or corrupt id must not size them. `collm data prepare` numbers ids 1..n; the
/// largest public benchmarks have a few million.
pub const MAX_ID: u32 = 1 << 26;

fn parse_id(s: &str, field: &str) -> std::result::Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v > MAX_ID => Err(format!(
            "field '{field}' is {v}: ids above {MAX_ID} are not supported (ids are numbered 1..n)"
        )),
        Ok(v) if v > 0 => Ok(v),
        Ok(_) => Err(format!(
            "field '{field}' is 0: ids start at 1 (0 is the padding id)"
        )),
        Err(_) => Err(format!(
            "field '{field}' is '{s}': expected a positive integer id"
        )),
    }
}

/// Parses `items.tsv` (`iid title`) into a table indexed by iid.
pub fn read_items_tsv(path: &Path) -> Result<Vec<String>> {
    let mut r = LineReader::open(path)?;
    let mut buf = Vec::new();
    match r.next_str(&mut buf)? {
        None => bail!(
            "{}: empty file: expected the header line 'iid<TAB>title'",
            path.display()
        ),
        Some(h) if h == ITEMS_HEADER => {}
        Some(h) => {
            let h = h.to_string();
            return Err(r.error(format!("bad header '{h}': expected 'iid<TAB>title'")));
        }
    }
    let mut pairs: Vec<(usize, String, usize)> = Vec::new();
    while let Some(line) = r.next_str(&mut buf)? {
        if line.is_empty() {
            continue;
        }
        let Some((id, title)) = line.split_once('\t') else {
            return Err(r.error("expected 2 tab-separated fields (iid, title), found 1"));
        };
        if title.contains('\t') {
            return Err(r.error("expected 2 tab-separated fields (iid, title), found more"));
        }
        let iid = parse_id(id, "iid").map_err(|e| r.error(e))? as usize;
        let title = title.trim();
        if title.is_empty() {
            return Err(r.error(format!("item {iid} has an empty title")));
        }
        pairs.push((iid, title.to_string(), r.line_no()));
    }
    // The table is indexed by id: ids far sparser than the file's items would size it by a
    // number in the file rather than by the file (one line must not cost gigabytes).
    let max = pairs.iter().map(|p| p.0).max().unwrap_or(0);
    if max > 16 * pairs.len() + 65_536 {
        bail!(
            "{}: item id {max} with only {} items: ids must be numbered densely from 1 (collm data prepare does this)",
            path.display(),
            pairs.len()
        );
    }
    let mut titles: Vec<String> = vec![String::new(); max + 1];
    for (iid, title, line) in pairs {
        if !titles[iid].is_empty() {
            bail!("{}:{line}: item {iid} is listed twice", path.display());
        }
        titles[iid] = title;
    }
    Ok(titles)
}

/// Checks that every item a split mentions (target or history) has a title; names the split
/// file and line otherwise.
pub fn check_titles(split_file: &Path, rows: &[Interaction], titles: &[String]) -> Result<()> {
    let has = |i: u32| titles.get(i as usize).is_some_and(|t| !t.is_empty());
    for (k, row) in rows.iter().enumerate() {
        // +2: one for the header, one for 1-based numbering.
        let line = k + 2;
        if !has(row.iid) {
            bail!(
                "{}:{line}: item {} has no title in {ITEMS_FILE}",
                split_file.display(),
                row.iid
            );
        }
        if let Some(&h) = row.history.iter().find(|&&h| !has(h)) {
            bail!(
                "{}:{line}: history item {h} has no title in {ITEMS_FILE}",
                split_file.display()
            );
        }
    }
    Ok(())
}

fn split_tsv(rows: &[Interaction]) -> String {
    let mut s = String::with_capacity(rows.len() * 32);
    s.push_str(SPLIT_HEADER);
    s.push('\n');
    for r in rows {
        let _ = write!(s, "{}\t{}\t{}\t{}\t", r.uid, r.iid, r.label, r.timestamp);
        for (k, h) in r.history.iter().enumerate() {
            if k > 0 {
                s.push(',');
            }
            let _ = write!(s, "{h}");
        }
        s.push('\n');
    }
    s
}

fn items_tsv(titles: &[String]) -> String {
    let mut s = String::from(ITEMS_HEADER);
    s.push('\n');
    for (iid, t) in titles.iter().enumerate().skip(1) {
        if !t.is_empty() {
            let _ = writeln!(s, "{iid}\t{t}");
        }
    }
    s
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What a source produces; [`write_dataset`] turns it into a directory with a manifest.
pub struct PreparedData {
    pub name: String,
    pub item_noun: String,
    pub source: SourceInfo,
    pub rule: String,
    pub splits: Vec<Split>,
    pub titles: Vec<String>,
}

/// Writes a dataset directory atomically and returns the dataset as written.
pub fn write_dataset(data: PreparedData, out: &Path, overwrite: bool) -> Result<Dataset> {
    write_dataset_into(data, AtomicDir::create(out, overwrite, MANIFEST_FILE)?, out)
}

/// [`write_dataset`] into an output opened (and locked) before the data was prepared: a
/// command that reads large sources takes its output first, so that a second writer, or one
/// that would replace a finished dataset without `--force`, is refused before any work.
pub fn write_dataset_into(data: PreparedData, dir: AtomicDir, out: &Path) -> Result<Dataset> {
    let items = items_tsv(&data.titles);
    let items_sha = sha256_hex(items.as_bytes());
    fs::write(dir.path().join(ITEMS_FILE), &items)
        .with_context(|| format!("{}: write error", dir.path().display()))?;
    let mut content = Sha256::new();
    content.update(items_sha.as_bytes());
    let mut splits = BTreeMap::new();
    let (mut max_u, mut max_i, mut min_u, mut min_i) = (0u32, 0u32, u32::MAX, u32::MAX);
    for (iid, t) in data.titles.iter().enumerate().skip(1) {
        if !t.is_empty() {
            max_i = max_i.max(iid as u32);
            min_i = min_i.min(iid as u32);
        }
    }
    for split in &data.splits {
        let text = split_tsv(&split.rows);
        let sha = sha256_hex(text.as_bytes());
        let file = format!("{}.tsv", split.name);
        fs::write(dir.path().join(&file), &text)
            .with_context(|| format!("{}: write error", dir.path().display()))?;
        let mut users = std::collections::HashSet::new();
        let mut items = std::collections::HashSet::new();
        for r in &split.rows {
            users.insert(r.uid);
            items.insert(r.iid);
            max_u = max_u.max(r.uid);
            min_u = min_u.min(r.uid);
            max_i = max_i.max(r.iid);
            min_i = min_i.min(r.iid);
        }
        let time_range = split
            .rows
            .iter()
            .map(|r| r.timestamp)
            .min()
            .zip(split.rows.iter().map(|r| r.timestamp).max())
            .map(|(a, b)| [a, b]);
        splits.insert(
            split.name.clone(),
            SplitInfo {
                file,
                rows: split.rows.len(),
                users: users.len(),
                items: items.len(),
                positives: split.rows.iter().filter(|r| r.label == 1).count(),
                sha256: sha,
                time_range,
            },
        );
    }
    for name in SPLIT_NAMES {
        if let Some(info) = splits.get(name) {
            content.update(name.as_bytes());
            content.update(info.sha256.as_bytes());
        }
    }
    let manifest = Manifest {
        format: "collm-dataset".into(),
        format_version: FORMAT_VERSION,
        name: data.name,
        item_noun: data.item_noun,
        created_by: format!("collm {}", env!("CARGO_PKG_VERSION")),
        source: data.source,
        rule: data.rule,
        splits,
        num_users: max_u as usize + 1,
        num_items: max_i as usize + 1,
        uid_range: [if min_u == u32::MAX { 0 } else { min_u }, max_u],
        iid_range: [if min_i == u32::MAX { 0 } else { min_i }, max_i],
        content_sha256: hex::encode(content.finalize()),
        items_sha256: Some(items_sha),
    };
    let json = serde_json::to_string_pretty(&manifest)?;
    write_file_atomic(&dir.path().join(MANIFEST_FILE), json.as_bytes())?;
    dir.commit()?;
    Ok(Dataset {
        manifest,
        splits: data.splits,
        titles: data.titles,
        dir: Some(out.to_path_buf()),
    })
}

/// Describes a source file for the manifest (size and SHA-256).
pub fn describe_source_file(path: &Path) -> Result<SourceFile> {
    let bytes = fs::metadata(path)
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    Ok(SourceFile {
        path: path.display().to_string(),
        bytes,
        sha256: sha256_file(path)?,
    })
}
