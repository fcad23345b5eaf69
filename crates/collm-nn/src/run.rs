//! The run directory every trainer writes (a collaborative model's, a CoLLM run's): locked
//! while a process writes it, removed again when a fresh run fails before its first
//! checkpoint, and checkpointed atomically as a whole.
//!
//! ```text
//! RUN/
//!   config.toml          what was trained, on what (written by the trainer)
//!   metrics.json         the curve and the best validation (rewritten after each checkpoint)
//!   checkpoint/
//!     CURRENT            the name of the committed checkpoint, written last (atomic rename)
//!     00000042/          one complete checkpoint: weights, optimizer state, loop state
//! ```
//! A checkpoint is written into a hidden directory, flushed, renamed to its own name, and only
//! then named in `CURRENT`; older ones are removed afterwards. A kill at any instant leaves
//! `CURRENT` naming either the previous checkpoint or the next one, never a mix of the two.
//! (Runs written before this layout keep their files in `checkpoint/` itself; they are read.)

use anyhow::{bail, Context, Result};
use collm_core::io::{crash_point, sync_dir, sync_tree, write_file_atomic, OutputLock};
use serde::{de::DeserializeOwned, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

pub const CHECKPOINT_DIR: &str = "checkpoint";
const CURRENT: &str = "CURRENT";
/// The loop state inside a checkpoint.
pub const STATE_FILE: &str = "state.json";

/// How to open a run directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// A new run: the directory must not hold one.
    #[default]
    New,
    /// Continue the run in the directory from its last checkpoint (a fresh start if it has none).
    Resume,
    /// A new run, replacing whatever run the directory holds.
    Force,
}

impl OpenMode {
    pub fn from_flags(resume: bool, force: bool) -> Result<Self> {
        match (resume, force) {
            (true, true) => bail!("--resume and --force exclude each other"),
            (true, false) => Ok(Self::Resume),
            (false, true) => Ok(Self::Force),
            (false, false) => Ok(Self::New),
        }
    }
}

/// An open run directory, locked against other writers until dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// This process created the run (nothing of it existed before).
    fresh: bool,
    /// A checkpoint exists (committed now or before).
    checkpointed: bool,
    finished: bool,
    /// Where the run goes. `path` differs from it while a `--force` replacement is built
    /// aside: the old run stays in place until the new one commits its first checkpoint (or
    /// finishes), then the new one is swapped in; a replacement that fails or is killed before
    /// then leaves the old run as it was.
    target: PathBuf,
    _lock: OutputLock,
}

/// A hidden sibling of the run at `path`: `.NAME.SUFFIX`.
fn aside(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: not a valid run path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{name}.{suffix}")))
}

/// Swaps the replacement `new` in for the run at `target`: the old run moves to `.NAME.old`,
/// `new` takes its place, the old run is removed. [`recover`] finishes a swap a kill cut short.
fn swap_in(new: &Path, target: &Path) -> Result<()> {
    let old = aside(target, "old")?;
    if target.exists() {
        fs::rename(target, &old)
            .with_context(|| format!("{}: cannot move the old run aside", target.display()))?;
    }
    crash_point();
    fs::rename(new, target)
        .with_context(|| format!("{}: cannot move the new run into place", target.display()))?;
    crash_point();
    fs::remove_dir_all(&old).ok();
    Ok(())
}

/// What a `--force` killed mid-way leaves (we hold the lock): a replacement that reached its
/// first checkpoint is swapped in, one that did not is removed, the old run is kept.
fn recover(target: &Path) -> Result<()> {
    let (new, old) = (aside(target, "new")?, aside(target, "old")?);
    if new.exists() {
        if current_checkpoint(&new)?.is_some() || new.join(".finished").exists() {
            swap_in(&new, target)?;
        } else {
            fs::remove_dir_all(&new)
                .with_context(|| format!("{}: cannot remove", new.display()))?;
        }
    }
    if old.exists() {
        if target.exists() {
            fs::remove_dir_all(&old).ok();
        } else {
            fs::rename(&old, target)
                .with_context(|| format!("{}: cannot restore", target.display()))?;
        }
    }
    Ok(())
}

impl RunDir {
    /// Locks and opens `path`. `config_file` marks a directory that holds a run.
    pub fn open(path: &Path, mode: OpenMode, config_file: &str) -> Result<Self> {
        let lock = OutputLock::acquire(path)?;
        recover(path)?;
        let holds_run = path.join(config_file).exists();
        let mut work = path.to_path_buf();
        match mode {
            OpenMode::New if holds_run => bail!(
                "{}: already holds a run (pass --resume to continue it, --force to replace it, or choose another --out)",
                path.display()
            ),
            OpenMode::Resume if !holds_run => bail!(
                "{}: no run to resume ({config_file} not found)",
                path.display()
            ),
            OpenMode::Force if path.exists() => {
                // Only a directory that looks like a run is removed: its config and a
                // checkpoint directory or metrics (never, say, a folder that merely holds a
                // config.toml).
                let looks_like_run = holds_run
                    && (path.join(CHECKPOINT_DIR).is_dir() || path.join("metrics.json").is_file());
                if !looks_like_run && fs::read_dir(path).map(|mut d| d.next().is_some())? {
                    bail!(
                        "{}: exists and is not a run directory; --force replaces runs only",
                        path.display()
                    );
                }
                // Built aside; the old run stays until the new one has a checkpoint.
                work = aside(path, "new")?;
            }
            _ => {}
        }
        let fresh = !work.exists();
        fs::create_dir_all(work.join(CHECKPOINT_DIR))
            .with_context(|| format!("{}: cannot create", work.display()))?;
        let mut run = Self {
            path: work.clone(),
            fresh,
            checkpointed: false,
            finished: false,
            target: path.to_path_buf(),
            _lock: lock,
        };
        let path = &work;
        run.checkpointed = run.checkpoint()?.is_some();
        run.remove_stale()?;
        // Temporary files of atomic writes that a kill interrupted (we hold the lock: no other
        // process is writing them).
        for e in fs::read_dir(path)? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(".tmp") && e.path().is_file() {
                fs::remove_file(e.path()).ok();
            }
        }
        Ok(run)
    }

    /// Where the run's files are written now: the run's directory, or while a `--force`
    /// replacement has no checkpoint yet, the hidden directory it is built in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A replacement built aside takes the old run's place.
    fn swap_in(&mut self) -> Result<()> {
        if self.path != self.target {
            swap_in(&self.path, &self.target)?;
            self.path = self.target.clone();
        }
        Ok(())
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The committed checkpoint's directory, if there is one.
    pub fn checkpoint(&self) -> Result<Option<PathBuf>> {
        current_checkpoint(&self.path)
    }

    /// Reads the loop state of the committed checkpoint.
    pub fn load_state<T: DeserializeOwned>(&self) -> Result<Option<(T, PathBuf)>> {
        let Some(dir) = self.checkpoint()? else {
            return Ok(None);
        };
        let p = dir.join(STATE_FILE);
        let text =
            fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let state = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid checkpoint state", p.display()))?;
        Ok(Some((state, dir)))
    }

    /// Commits a checkpoint: `write` fills a new directory (weights, optimizer), the loop
    /// state is added as `state.json`, everything is flushed, and `CURRENT` is switched to it.
    pub fn commit_checkpoint<T: Serialize>(
        &mut self,
        state: &T,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let root = self.path.join(CHECKPOINT_DIR);
        let seq = match fs::read_to_string(root.join(CURRENT)) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0) + 1,
            Err(_) => 1,
        };
        let name = format!("{seq:08}");
        let tmp = root.join(format!(".{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ok();
        }
        fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&tmp)?;
        crash_point();
        fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)
            .with_context(|| format!("{}: write error", tmp.display()))?;
        sync_tree(&tmp)?;
        crash_point();
        let dir = root.join(&name);
        if dir.exists() {
            fs::remove_dir_all(&dir).ok();
        }
        fs::rename(&tmp, &dir).with_context(|| format!("{}: cannot rename", dir.display()))?;
        crash_point();
        sync_dir(&root)?;
        write_file_atomic(&root.join(CURRENT), name.as_bytes())?;
        sync_dir(&root)?;
        self.checkpointed = true;
        self.swap_in()?;
        self.remove_stale()
    }

    /// Removes everything in checkpoint/ but `CURRENT` and the checkpoint it names: older
    /// checkpoints, one abandoned by a kill, or files of the old single-directory layout.
    fn remove_stale(&self) -> Result<()> {
        let root = self.path.join(CHECKPOINT_DIR);
        let Ok(name) = fs::read_to_string(root.join(CURRENT)) else {
            return Ok(()); // no checkpoint yet, or the old layout: nothing is stale
        };
        let name = name.trim().to_string();
        for e in fs::read_dir(&root)? {
            let e = e?;
            let n = e.file_name();
            if n == CURRENT || n == name.as_str() {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                fs::remove_dir_all(&p).ok();
            } else {
                fs::remove_file(&p).ok();
            }
            crash_point();
        }
        Ok(())
    }

    /// Writes a JSON file of the run atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        write_file_atomic(
            &self.path.join(name),
            serde_json::to_string_pretty(value)?.as_bytes(),
        )
    }

    /// The run ended without error: it is kept whatever happened.
    pub fn finish(mut self) -> Result<()> {
        if self.path != self.target {
            // A run with no checkpoint (ICL) is complete here: mark it, so that a kill during
            // the swap still swaps it in.
            fs::write(self.path.join(".finished"), b"")?;
            self.swap_in()?;
            fs::remove_file(self.path.join(".finished")).ok();
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for RunDir {
    /// A run this process created and that failed before its first checkpoint is removed:
    /// there is nothing in it to resume, and a rerun should not find it in the way. (A
    /// `--force` replacement is removed from where it was built; the old run never moved.)
    fn drop(&mut self) {
        if self.fresh && !self.finished && !self.checkpointed {
            fs::remove_dir_all(&self.path).ok();
        }
    }
}

/// The seed of one epoch's data order and dropout, from the run's seed: a function of (seed,
/// epoch) only, so that a resumed run sees the same epochs as an uninterrupted one.
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Early stopping's test: does a validation AUC of `new` beat the best so far? The first
/// defined AUC always does; an undefined one (a split with one label) never does.
pub fn improves(best: Option<f64>, new: Option<f64>) -> bool {
    match (best, new) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(b), Some(a)) => a > b,
    }
}

/// The committed checkpoint directory of the run at `run`, if any (read-only; no lock).
pub fn current_checkpoint(run: &Path) -> Result<Option<PathBuf>> {
    let root = run.join(CHECKPOINT_DIR);
    match fs::read_to_string(root.join(CURRENT)) {
        Ok(name) => {
            let name = name.trim();
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                bail!(
                    "{}: names '{name}', not a checkpoint",
                    root.join(CURRENT).display()
                );
            }
            let dir = root.join(name);
            if !dir.join(STATE_FILE).is_file() {
                bail!(
                    "{}: names checkpoint '{name}', which is missing or incomplete",
                    root.join(CURRENT).display()
                );
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The layout before CURRENT: the files in checkpoint/ itself.
            Ok(root.join(STATE_FILE).is_file().then_some(root))
        }
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", root.join(CURRENT).display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_replace_the_checkpoint_and_clean_up() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("run");
        let mut run = RunDir::open(&p, OpenMode::New, "config.toml").unwrap();
        assert!(run.checkpoint().unwrap().is_none());
        for k in 1..=3u32 {
            run.commit_checkpoint(&k, |d| {
                fs::write(d.join("w.bin"), k.to_le_bytes())?;
                Ok(())
            })
            .unwrap();
            let (state, dir) = run.load_state::<u32>().unwrap().unwrap();
            assert_eq!(state, k);
            assert_eq!(fs::read(dir.join("w.bin")).unwrap(), k.to_le_bytes());
        }
        let mut names: Vec<String> = fs::read_dir(p.join(CHECKPOINT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["00000003", "CURRENT"]);
        run.finish().unwrap();
    }

    #[test]
    fn a_fresh_run_that_fails_before_a_checkpoint_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("run");
        {
            let run = RunDir::open(&p, OpenMode::New, "config.toml").unwrap();
            fs::write(run.join("config.toml"), "x").unwrap();
        }
        assert!(!p.exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "no lock left");
        // With a checkpoint it stays (it can be resumed).
        {
            let mut run = RunDir::open(&p, OpenMode::New, "config.toml").unwrap();
            fs::write(run.join("config.toml"), "x").unwrap();
            run.commit_checkpoint(&1u32, |_| Ok(())).unwrap();
        }
        assert!(p.join("config.toml").exists());
        let e = RunDir::open(&p, OpenMode::New, "config.toml").unwrap_err();
        assert!(e.to_string().contains("already holds a run"), "{e}");
        let run = RunDir::open(&p, OpenMode::Resume, "config.toml").unwrap();
        assert_eq!(run.load_state::<u32>().unwrap().unwrap().0, 1);
        drop(run);
        assert!(p.exists(), "a resumed run is never removed");
        let run = RunDir::open(&p, OpenMode::Force, "config.toml").unwrap();
        assert!(run.checkpoint().unwrap().is_none(), "--force starts over");
        drop(run);
        assert!(
            p.join("config.toml").exists(),
            "a failed --force keeps the old run"
        );
        // A folder that merely holds a config.toml is not a run: --force leaves it alone.
        let other = tmp.path().join("configs");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("config.toml"), "x").unwrap();
        fs::write(other.join("notes.txt"), "keep me").unwrap();
        let e = RunDir::open(&other, OpenMode::Force, "config.toml").unwrap_err();
        assert!(e.to_string().contains("not a run directory"), "{e}");
        assert!(other.join("notes.txt").is_file());
    }

    /// A run with one checkpoint and a weights file, as a finished run looks.
    fn old_run(p: &Path) {
        let mut run = RunDir::open(p, OpenMode::New, "config.toml").unwrap();
        fs::write(run.join("config.toml"), "old").unwrap();
        fs::write(run.join("model.bin"), "old weights").unwrap();
        run.commit_checkpoint(&1u32, |_| Ok(())).unwrap();
        run.finish().unwrap();
    }

    fn siblings(p: &Path) -> Vec<String> {
        fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && !n.ends_with(".lock"))
            .collect()
    }

    #[test]
    fn force_builds_aside_and_swaps_in_at_the_first_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("run");
        old_run(&p);
        // Fails before its first checkpoint: the old run is untouched, nothing is left.
        {
            let run = RunDir::open(&p, OpenMode::Force, "config.toml").unwrap();
            assert_ne!(run.path(), p.as_path(), "built aside");
            fs::write(run.join("config.toml"), "new").unwrap();
            assert_eq!(fs::read_to_string(p.join("config.toml")).unwrap(), "old");
        }
        assert_eq!(
            fs::read_to_string(p.join("model.bin")).unwrap(),
            "old weights"
        );
        assert!(siblings(&p).is_empty(), "{:?}", siblings(&p));
        // Succeeds: the first checkpoint swaps the new run in, the old one is gone.
        let mut run = RunDir::open(&p, OpenMode::Force, "config.toml").unwrap();
        fs::write(run.join("config.toml"), "new").unwrap();
        run.commit_checkpoint(&2u32, |_| Ok(())).unwrap();
        assert_eq!(run.path(), p.as_path());
        run.write_json("metrics.json", &2u32).unwrap();
        run.finish().unwrap();
        assert_eq!(fs::read_to_string(p.join("config.toml")).unwrap(), "new");
        assert!(!p.join("model.bin").exists());
        assert!(p.join("metrics.json").is_file());
        assert!(siblings(&p).is_empty(), "{:?}", siblings(&p));
        // A replacement that never checkpoints (ICL) swaps in when it finishes.
        old_run(&tmp.path().join("icl"));
        let icl = tmp.path().join("icl");
        let run = RunDir::open(&icl, OpenMode::Force, "config.toml").unwrap();
        fs::write(run.join("config.toml"), "new").unwrap();
        run.finish().unwrap();
        assert_eq!(fs::read_to_string(icl.join("config.toml")).unwrap(), "new");
        assert!(siblings(&icl).is_empty());
    }

    #[test]
    fn what_a_killed_force_left_is_recovered_by_the_next_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("run");
        // Killed before the replacement's first checkpoint: it is dropped.
        old_run(&p);
        let new = aside(&p, "new").unwrap();
        fs::create_dir_all(new.join(CHECKPOINT_DIR)).unwrap();
        fs::write(new.join("config.toml"), "new").unwrap();
        drop(RunDir::open(&p, OpenMode::Resume, "config.toml").unwrap());
        assert_eq!(fs::read_to_string(p.join("config.toml")).unwrap(), "old");
        assert!(!new.exists());
        // Killed between the swap's two renames: the new run (it has a checkpoint) goes in.
        let mut run = RunDir::open(&p, OpenMode::Force, "config.toml").unwrap();
        fs::write(run.join("config.toml"), "new").unwrap();
        let built = run.path().to_path_buf();
        // Commit by hand what commit_checkpoint writes, without its swap.
        let root = built.join(CHECKPOINT_DIR);
        fs::create_dir_all(root.join("00000001")).unwrap();
        fs::write(root.join("00000001").join(STATE_FILE), "3").unwrap();
        fs::write(root.join(CURRENT), "00000001").unwrap();
        run.checkpointed = true; // as commit_checkpoint leaves it; the kill comes next
        std::mem::forget(run); // killed: no destructor (its lock goes with the process)
        let old = aside(&p, "old").unwrap();
        fs::rename(&p, &old).unwrap();
        let lock = tmp.path().join(".run.lock");
        fs::remove_file(&lock).ok();
        let _ = lock;
        drop(RunDir::open(&p, OpenMode::Resume, "config.toml").unwrap());
        assert_eq!(fs::read_to_string(p.join("config.toml")).unwrap(), "new");
        assert!(!old.exists() && !built.exists());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("run");
        let _a = RunDir::open(&p, OpenMode::New, "config.toml").unwrap();
        let e = RunDir::open(&p, OpenMode::New, "config.toml").unwrap_err();
        assert!(e.to_string().contains("another collm process"), "{e}");
    }

    #[test]
    fn the_old_single_directory_layout_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join(CHECKPOINT_DIR);
        fs::create_dir_all(&ck).unwrap();
        fs::write(ck.join(STATE_FILE), "7").unwrap();
        assert_eq!(current_checkpoint(tmp.path()).unwrap(), Some(ck));
    }
}
