//! `collm compact`: a finished run's best weights in half precision (`F16` or `BF16`), swapped
//! in atomically.
//!
//! The compacted run is built beside the run (`.NAME.compact`: every file hard-linked from the
//! run but the weights, which are converted, and the weights manifest, rewritten to match),
//! flushed, then exchanged with the run in one `renameat2(RENAME_EXCHANGE)`: a kill at any moment
//! leaves the old run or the new one, whole, at the run's path (what is left aside is removed by
//! the next `compact` of that run). Where the file system cannot exchange two directories, the
//! swap is two renames (the old run to `.NAME.compact-old`, the new one into place); a kill
//! between them leaves no run at the path until the next `compact` of it puts the new one there.
//! The run's lock is held throughout (a run that is training is refused), and only finished runs
//! are compacted (`metrics.json` says why training stopped).

use crate::run::BEST_DIR;
use crate::run::{check_weights_manifest, weight_files, write_weights_manifest};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use collm_core::io::{crash_point, sync_dir, sync_tree, OutputLock};
use collm_metrics::RunKind;
use std::fs;
use std::path::{Path, PathBuf};

/// One file [`compact`] rewrote.
#[derive(Debug, Clone)]
pub struct CompactedFile {
    pub path: PathBuf,
    pub stats: collm_nn::params::Compacted,
}

/// What [`compact`] did.
#[derive(Debug, Clone)]
pub enum Compaction {
    /// The files rewritten (paths inside the run).
    Done(Vec<CompactedFile>),
    /// Every weight was in half precision already (`F16` or `BF16`, as found): nothing was
    /// written (converting f16 to bf16 would only lose bits).
    AlreadyHalf(DType),
}

/// A hidden sibling of `run`: `.NAME.what`.
fn aside(run: &Path, what: &str) -> Result<PathBuf> {
    let name = run
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: not a valid run path", run.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match run.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{name}.{what}")))
}

/// Marks a staged run as complete (written and flushed): only such a one is swapped in when
/// an interrupted two-rename swap is finished.
const COMPLETE: &str = ".compact-complete";

/// Finishes or undoes what a killed `compact` of `run` left (the lock is held): a missing run
/// whose complete replacement is staged gets it, one whose old copy is aside gets that back;
/// leftovers are removed.
fn recover(run: &Path, staged: &Path, old: &Path) -> Result<()> {
    if !run.exists() {
        if staged.join(COMPLETE).exists() {
            fs::rename(staged, run).with_context(|| {
                format!(
                    "{}: cannot move the compacted run into place",
                    run.display()
                )
            })?;
        } else if old.exists() {
            fs::rename(old, run).with_context(|| format!("{}: cannot restore", run.display()))?;
        }
    }
    for p in [staged, old] {
        if p.exists() {
            fs::remove_dir_all(p).with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    fs::remove_file(run.join(COMPLETE)).ok();
    Ok(())
}

/// `src` copied to `dst` with every file hard-linked (none is ever rewritten in place: atomic
/// writes replace files), except `skip` (paths relative to `src`) and hidden entries.
fn link_tree(src: &Path, dst: &Path, skip: &[PathBuf], rel: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    for e in fs::read_dir(src).with_context(|| format!("{}: cannot read", src.display()))? {
        let e = e?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let (from, to, r) = (e.path(), dst.join(&name), rel.join(&name));
        if e.file_type()?.is_dir() {
            link_tree(&from, &to, skip, &r)?;
        } else if !skip.contains(&r) {
            fs::hard_link(&from, &to)
                .or_else(|_| fs::copy(&from, &to).map(|_| ()))
                .with_context(|| {
                    format!("{}: cannot link into {}", from.display(), dst.display())
                })?;
        }
    }
    Ok(())
}

/// Exchanges the directories `a` and `b` atomically (Linux `renameat2(RENAME_EXCHANGE)`);
/// `Ok(false)` where the file system cannot.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths; the call reads them only.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e).with_context(|| format!("{}: cannot swap in {}", b.display(), a.display())),
    }
}

/// The float dtypes of a safetensors file's tensors.
fn float_dtypes(p: &Path) -> Result<Vec<DType>> {
    let tensors = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: cannot read weights", p.display()))?;
    Ok(tensors
        .values()
        .map(|t| t.dtype())
        .filter(|d| d.is_float())
        .collect())
}

/// Stores the best weights of the finished run `run` in half precision (`F16` or `BF16`): a
/// CoLLM run's `best/` files (its weights manifest rewritten to match), a collaborative run's
/// `model.safetensors` (and its manifest). Everything that loads the run reads them as before
/// (converted back to f32 on load), each weight rounded once; evaluate the run again after
/// compacting it, since its scores move by that rounding. A checkpoint is left alone (a resumed
/// run trains on f32). Compacting a run that another run references (a CF run, a step-1 run)
/// changes the hash that run recorded, and it then refuses to load: compact only the runs at
/// the end of a chain. Atomic and locked: see the module's documentation.
pub fn compact(run: &Path, dtype: DType) -> Result<Compaction> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        bail!("compact: dtype must be f16 or bf16, not {dtype:?}");
    }
    let _lock = OutputLock::acquire(run)?;
    let (staged, old) = (aside(run, "compact")?, aside(run, "compact-old")?);
    recover(run, &staged, &old)?;
    let metrics = run.join("metrics.json");
    let stopped = fs::read_to_string(&metrics)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|m| m.get("stopped").is_some_and(|s| !s.is_null()));
    if !stopped {
        bail!(
            "{}: the run has not finished training ({} says no reason it stopped): compact finished runs only (resume it first: `collm train … --resume`)",
            run.display(),
            metrics.display()
        );
    }
    let kind = RunKind::of_run(run)?;
    let files: Vec<PathBuf> = match kind {
        RunKind::Cf => {
            let p = PathBuf::from(collm_cf::run::MODEL_FILE);
            if !run.join(&p).is_file() {
                bail!("{}: not found (nothing to compact)", run.join(&p).display());
            }
            collm_cf::run::check_weights_manifest(run)?;
            vec![p]
        }
        RunKind::Collm => {
            let best = run.join(BEST_DIR);
            check_weights_manifest(&best)?;
            let mut names: Vec<PathBuf> = weight_files(&best)?
                .into_keys()
                .map(|rel| Path::new(BEST_DIR).join(rel))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            names.sort();
            if names.is_empty() {
                bail!("{}: no weights (nothing to compact)", best.display());
            }
            names
        }
    };
    let mut found = Vec::new();
    for f in &files {
        found.extend(float_dtypes(&run.join(f))?);
    }
    if !found.contains(&DType::F32) {
        let half = found.first().copied().unwrap_or(dtype);
        return Ok(Compaction::AlreadyHalf(half));
    }
    // The compacted run, beside the old one.
    let built = (|| -> Result<Vec<CompactedFile>> {
        link_tree(run, &staged, &files, Path::new(""))?;
        let mut out = Vec::new();
        for f in &files {
            let stats = collm_nn::params::compact_file(&run.join(f), dtype, &staged.join(f))?;
            out.push(CompactedFile {
                path: run.join(f),
                stats,
            });
        }
        match kind {
            RunKind::Cf => collm_cf::run::write_weights_manifest(&staged)?,
            RunKind::Collm => write_weights_manifest(&staged.join(BEST_DIR))?,
        }
        fs::write(staged.join(COMPLETE), b"")?;
        sync_tree(&staged)?;
        Ok(out)
    })();
    let out = match built {
        Ok(out) => out,
        Err(e) => {
            fs::remove_dir_all(&staged).ok();
            return Err(e);
        }
    };
    crash_point();
    if exchange(&staged, run)? {
        crash_point();
    } else {
        fs::rename(run, &old)
            .with_context(|| format!("{}: cannot move the old run aside", run.display()))?;
        crash_point();
        fs::rename(&staged, run).with_context(|| {
            format!(
                "{}: cannot move the compacted run into place",
                run.display()
            )
        })?;
        crash_point();
    }
    if let Some(parent) = run.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    recover(run, &staged, &old)?;
    Ok(Compaction::Done(out))
}
