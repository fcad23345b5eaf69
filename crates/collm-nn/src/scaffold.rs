//! The training scaffold both trainers share (a collaborative model's, a CoLLM run's): resume
//! from the run directory's checkpoint, validation intervals, early stopping on validation AUC
//! with patience, the best weights kept, a checkpoint committed and `metrics.json` rewritten
//! after every validation, and between validations by time ([`Between`]). A stop asked for
//! ([`collm_core::progress::interrupt`]: SIGTERM on the command line, Ctrl-C in a notebook)
//! ends the run at its next resumable point with a checkpoint of where it stood: after a
//! validation's checkpoint, or at a [`Between::tick`] (then `Err(Interrupted)`). A trainer
//! supplies its interval (train up to the next validation, then validate), its checkpoint
//! contents and its best-weights file; see [`Trainer`].

use crate::run::{improves, RunDir};
use anyhow::Result;
use collm_core::progress::{Interrupted, Progress};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// The early-stopping part of a trainer's loop state (which is also its `metrics.json`).
pub trait LoopState: Serialize + DeserializeOwned {
    /// The best validation AUC so far.
    fn best_auc(&self) -> Option<f64>;
    /// Validations since the last improvement.
    fn without_improvement(&mut self) -> &mut usize;
    /// Why training ended, once it has.
    fn stopped(&self) -> Option<&str>;
    fn set_stopped(&mut self, why: &str);
}

/// What one validation gave.
pub struct Validation {
    pub auc: Option<f64>,
}

/// A trainer driven by [`drive`].
pub trait Trainer {
    type State: LoopState;
    /// Loads weights and optimizer state from a checkpoint directory.
    fn restore(&mut self, checkpoint: &Path) -> Result<()>;
    /// Called once before the first interval of this invocation (fresh or resumed).
    fn start(&mut self, _state: &mut Self::State) -> Result<()> {
        Ok(())
    }
    /// Trains up to the next validation (an epoch; `eval_every` optimizer steps), validates,
    /// and adds the curve point to `state`. A trainer whose interval is long calls
    /// [`Between::tick`] after each unit of work it can resume from (an optimizer step) that
    /// does not end the interval, with `state` holding everything a resume needs, and validates
    /// inside
    /// [`collm_core::progress::defer_interrupts`] (a stop asked meanwhile comes after the
    /// validation's checkpoint).
    fn interval(&mut self, state: &mut Self::State, between: &mut Between) -> Result<Validation>;
    /// A new best: records it in `state` and writes its weights into the run.
    fn keep_best(&mut self, state: &mut Self::State, run: &Path) -> Result<()>;
    /// The reason to stop once the budget (epochs, steps) is spent.
    fn budget_spent(&self, state: &Self::State) -> Option<&'static str>;
    /// Validations without improvement before stopping.
    fn patience(&self) -> usize;
    /// Writes weights and optimizer state into a new checkpoint directory.
    fn checkpoint(&self, dir: &Path) -> Result<()>;
    /// After each validation (progress display).
    fn validated(&mut self, _state: &Self::State, _v: &Validation) {}
}

/// Checkpoints between validations: once `every` has passed since the last checkpoint, the
/// next [`Between::tick`] commits one (and rewrites `metrics.json`), so that a run killed at
/// any moment loses at most that much work. `None`: only at validations.
pub struct Between<'a> {
    run: &'a mut RunDir,
    metrics_file: &'a str,
    every: Option<Duration>,
    last: Instant,
}

impl Between<'_> {
    /// Commits a checkpoint of `trainer` in `state` if the time has come; if a stop was asked
    /// for, commits one and returns `Err(Interrupted)`.
    pub fn tick<T: Trainer>(&mut self, trainer: &T, state: &T::State) -> Result<()> {
        if collm_core::progress::interrupt_asked() {
            self.commit(trainer, state)?;
            tracing::info!(
                "stopped on request{}: a checkpoint of where the run stood is committed (resume it to go on)",
                signal_name()
            );
            return Err(Interrupted.into());
        }
        match self.every {
            Some(every) if self.last.elapsed() >= every => self.commit(trainer, state),
            _ => Ok(()),
        }
    }

    fn commit<T: Trainer>(&mut self, trainer: &T, state: &T::State) -> Result<()> {
        self.run
            .commit_checkpoint(state, |dir| trainer.checkpoint(dir))?;
        self.run.write_json(self.metrics_file, state)?;
        self.last = Instant::now();
        Ok(())
    }
}

/// " by SIGTERM" and the like, when a signal asked for the stop.
fn signal_name() -> String {
    match collm_core::progress::interrupting_signal() {
        Some(15) => " by SIGTERM".into(),
        Some(2) => " by SIGINT".into(),
        Some(1) => " by SIGHUP".into(),
        Some(s) => format!(" by signal {s}"),
        None => String::new(),
    }
}

/// Runs `trainer` in `run` until early stopping or the end of its budget, from the run's
/// checkpoint if it has one (else from `fresh`); `stop_after` ends this invocation after that
/// many validations (tests of resume). Writes `metrics_file` after every checkpoint; commits a
/// checkpoint between validations too once `checkpoint_every` has passed since the last one
/// (`None`: only at validations).
pub fn drive<T: Trainer>(
    trainer: &mut T,
    run: &mut RunDir,
    fresh: T::State,
    metrics_file: &str,
    stop_after: Option<usize>,
    checkpoint_every: Option<Duration>,
) -> Result<T::State> {
    let mut state = match run.load_state::<T::State>()? {
        Some((state, dir)) => {
            trainer.restore(&dir)?;
            state
        }
        None => fresh,
    };
    if state.stopped().is_some() {
        // The kill may have come between the checkpoint and metrics.json.
        run.write_json(metrics_file, &state)?;
        return Ok(state);
    }
    trainer.start(&mut state)?;
    let mut between = Between {
        run,
        metrics_file,
        every: checkpoint_every,
        last: Instant::now(),
    };
    let mut done = 0;
    loop {
        let v = trainer.interval(&mut state, &mut between)?;
        let run = &mut *between.run;
        if improves(state.best_auc(), v.auc) {
            trainer.keep_best(&mut state, run.path())?;
            *state.without_improvement() = 0;
        } else {
            *state.without_improvement() += 1;
        }
        if *state.without_improvement() >= trainer.patience() {
            state.set_stopped("patience");
        } else if let Some(why) = trainer.budget_spent(&state) {
            state.set_stopped(why);
        }
        between.commit(trainer, &state)?;
        trainer.validated(&state, &v);
        done += 1;
        if state.stopped().is_some() || stop_after == Some(done) {
            return Ok(state);
        }
        if collm_core::progress::interrupt_asked() {
            tracing::info!(
                "stopped on request{} after a validation and its checkpoint (resume the run to go on)",
                signal_name()
            );
            return Err(Interrupted.into());
        }
    }
}

/// The progress bar both trainers show: `len` units (epochs, steps) named `unit`, hidden when
/// `quiet` (see [`collm_core::progress`]).
pub fn progress_bar(len: usize, unit: &str, prefix: String, quiet: bool) -> Progress {
    Progress::new(len, unit, prefix, quiet)
}
