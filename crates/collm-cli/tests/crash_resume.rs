//! A killed training run resumes to exactly the result of an uninterrupted one, wherever the
//! kill lands. Each run is a real `collm train` process:
//! - deterministic kills: `COLLM_CRASH_AT=N` aborts the process at its N-th crash point (between
//!   the steps of every atomic write and checkpoint commit), for every N the run has;
//! - real `kill -9` at spread-out moments of a run.
//!
//! After each kill the run is resumed (`--resume`, or a plain rerun when the kill came before the
//! run's config was written) and its weights and metrics must equal the uninterrupted run's, byte
//! for byte (metrics without their wall-clock fields).

mod common;

use collm::testing::{Family, Spec};
use collm_data::sources::synthetic::SyntheticOptions;
use common::{copy_dir, metrics, s};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

fn collm(args: &[&str], crash_at: Option<usize>) -> Output {
    let env: Vec<(&str, String)> = crash_at
        .map(|n| ("COLLM_CRASH_AT", n.to_string()))
        .into_iter()
        .collect();
    common::collm_env(args, &env)
}

fn ok(args: &[&str]) {
    common::ok(args);
}

/// Every weight file of the run (best weights and the checkpoint's), by relative path.
fn weights(run: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                // The checkpoint's directory name counts commits; compare by file name.
                let rel = match rel.strip_prefix("checkpoint/") {
                    Some(r) => format!("checkpoint/{}", &r[r.find('/').unwrap() + 1..]),
                    None => rel,
                };
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(run, run, &mut out);
    out.sort();
    out
}

/// Trains `run` with `args` (which end in `--out RUN`) to completion after a kill: `--resume`
/// when the run's config exists, else a fresh start.
fn finish(args: &[&str], run: &Path) {
    let mut a = args.to_vec();
    if run.join("config.toml").exists() {
        a.push("--resume");
    }
    ok(&a);
}

fn same(reference: &Path, run: &Path, what: &str) {
    assert_eq!(metrics(reference), metrics(run), "{what}: metrics differ");
    let (a, b) = (weights(reference), weights(run));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "{what}: weight files differ"
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{what}: {name} differs");
    }
}

/// Kills `args` (a training command whose `--out` is `run`) at every crash point, then at
/// `real_kills` moments with SIGKILL, resuming each time; returns (kill points, identical).
fn kill_everywhere(
    args: &dyn Fn(&Path) -> Vec<String>,
    root: &Path,
    reference: &Path,
    real_kills: usize,
) -> (usize, usize) {
    let (mut points, mut identical) = (0, 0);
    let mut n = 1;
    loop {
        let run = root.join(format!("crash-{n}"));
        let a = args(&run);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = collm(&a, Some(n));
        if o.status.success() {
            break; // past the last crash point: the run finished
        }
        assert!(
            o.status.code().is_none(),
            "crash point {n}: expected an abort, got {:?}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        finish(&a, &run);
        same(reference, &run, &format!("crash point {n}"));
        points += 1;
        identical += 1;
        std::fs::remove_dir_all(&run).unwrap();
        n += 1;
    }
    assert!(points > 10, "only {points} crash points");
    // Real kills, spread over an uninterrupted run's duration.
    let t = Instant::now();
    let a = args(&root.join("timing"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(&a);
    let total = t.elapsed();
    for k in 0..real_kills {
        let run = root.join(format!("kill-{k}"));
        let a = args(&run);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_collm"))
            .args(&a)
            .env("COLLM_LOG", "error")
            .spawn()
            .unwrap();
        std::thread::sleep(total.mul_f64((k as f64 + 0.5) / real_kills as f64));
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        finish(&a, &run);
        same(reference, &run, &format!("kill -9 at {k}"));
        points += 1;
        identical += 1;
    }
    (points, identical)
}

/// The dataset (40 users, 30 items) and backbone every run here trains on, made once.
fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            data: SyntheticOptions {
                users: 40,
                items: 30,
                rows_per_user: 8.0,
                ..Default::default()
            },
            cf: vec![],
            step1: false,
            step2: vec![],
            ..Spec::default()
        })
        .unwrap()
    })
}

/// `collm train cf`: a tiny MF (dim 8) on the family's data into `run`.
fn train_mf_args(run: &Path, max_epochs: usize, patience: usize) -> Vec<String> {
    let data = family().data();
    let (e, p) = (max_epochs.to_string(), patience.to_string());
    [
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        s(&data),
        "--dim",
        "8",
        "--max-epochs",
        &e,
        "--patience",
        &p,
        "--quiet",
        "--out",
        s(run),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_killed_cf_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |run: &Path| train_mf_args(run, 5, 100);
    let reference = tmp.path().join("reference");
    let a = args(&reference);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (points, identical) = kill_everywhere(&args, tmp.path(), &reference, 4);
    eprintln!("cf: {identical} of {points} kill points resumed identically");
    assert_eq!(points, identical);
}

/// A tiny TALLRec run's config: 6 steps, validation every `eval_every`, and with
/// `checkpoint_minutes` (0: at validations only).
fn tallrec_config(dir: &Path, eval_every: usize, checkpoint_minutes: f64) -> std::path::PathBuf {
    tallrec_config_steps(dir, 6, eval_every, checkpoint_minutes)
}

/// [`tallrec_config`] with `max_steps` steps.
fn tallrec_config_steps(
    dir: &Path,
    max_steps: usize,
    eval_every: usize,
    checkpoint_minutes: f64,
) -> std::path::PathBuf {
    let config = dir.join("tallrec.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"tallrec\"\ndata = {:?}\nbackbone = {:?}\nmax_steps = {max_steps}\neval_every = {eval_every}\n\
eval_rows = 20\nbatch_size = 4\nwarmup_steps = 1\nlr = 0.01\ntrain_rows = 40\n\
checkpoint_minutes = {checkpoint_minutes:e}\n",
            family().data().display().to_string(),
            family().backbone().display().to_string()
        ),
    )
    .unwrap();
    config
}

fn train_collm_args(config: &Path, run: &Path) -> Vec<String> {
    [
        "train",
        "collm",
        "--config",
        config.to_str().unwrap(),
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_killed_collm_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tallrec_config(tmp.path(), 2, 0.0);
    let args = |run: &Path| train_collm_args(&config, run);
    let reference = tmp.path().join("reference");
    let a = args(&reference);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (points, identical) = kill_everywhere(&args, tmp.path(), &reference, 3);
    eprintln!("collm: {identical} of {points} kill points resumed identically");
    assert_eq!(points, identical);
}

/// With `checkpoint_minutes`, checkpoints come between validations too (here after every
/// step): a run killed anywhere resumes from one to the same result, train losses included.
#[test]
fn a_collm_run_killed_between_validations_resumes_from_its_latest_step() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tallrec_config(tmp.path(), 3, 1e-9);
    let args = |run: &Path| train_collm_args(&config, run);
    let reference = tmp.path().join("reference");
    let a = args(&reference);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Killed at a crash point of its second step: its checkpoint is at step 1, between the
    // validations at 0 and 3.
    let mut steps_seen = std::collections::BTreeSet::new();
    for n in 1.. {
        let run = tmp.path().join(format!("probe-{n}"));
        let a = args(&run);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        if collm(&a, Some(n)).status.success() {
            break;
        }
        if let Ok(m) = std::fs::read_to_string(run.join("metrics.json")) {
            let m: serde_json::Value = serde_json::from_str(&m).unwrap();
            steps_seen.insert(m["step"].as_u64().unwrap());
        }
        std::fs::remove_dir_all(&run).ok();
    }
    for step in [1, 2, 4, 5] {
        assert!(
            steps_seen.contains(&step),
            "no checkpoint at step {step}: {steps_seen:?}"
        );
    }
    let (points, identical) = kill_everywhere(&args, tmp.path(), &reference, 3);
    eprintln!(
        "collm, checkpoints every step: {identical} of {points} kill points resumed identically"
    );
    assert_eq!(points, identical);
}

/// Starts `collm ARGS` (a training whose `--out` is `run`), sends it SIGTERM once `run` holds
/// `file` (or 60 s have passed), and returns its output.
fn sigterm_once(args: &[&str], run: &Path, file: &str) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_collm"))
        .args(args)
        .env("COLLM_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !run.join(file).exists() && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait_with_output().unwrap()
}

/// Trains `args(ROOT/reference)` to its end, then `args(ROOT/stopped)` stopped by SIGTERM once
/// it holds `file`, which must exit with 143 saying so; returns the two runs, the stopped run's
/// arguments and its stderr.
fn sigterm_against_reference(
    args: &dyn Fn(&Path) -> Vec<String>,
    root: &Path,
    file: &str,
) -> (PathBuf, PathBuf, Vec<String>, String) {
    let reference = root.join("reference");
    ok(&args(&reference)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let run = root.join("stopped");
    let a = args(&run);
    let o = sigterm_once(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &run,
        file,
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    (reference, run, a, err)
}

/// SIGTERM (what the table's driver sends its trainer when stopped, and a machine's shutdown
/// sends every process) stops a CoLLM run at its next step with a checkpoint of that step, where
/// `kill -9` loses everything since the last checkpoint. Here checkpoints come at validations
/// only and the only validation is the last step's, so a checkpoint in the stopped run can only
/// be the stop's; resumed, the run ends exactly as the uninterrupted one.
#[test]
fn a_collm_run_stopped_by_sigterm_checkpoints_its_step_and_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tallrec_config_steps(tmp.path(), 40, 40, 0.0);
    // The run's config is written before its first step.
    let (reference, run, a, err) = sigterm_against_reference(
        &|run: &Path| train_collm_args(&config, run),
        tmp.path(),
        "config.toml",
    );
    assert!(
        err.contains("a checkpoint of where the run stood is committed"),
        "{err}"
    );
    let m = metrics(&run);
    let step = m["step"].as_u64().unwrap();
    assert!((1..40).contains(&step), "stopped at step {step}");
    assert!(m["curve"].as_array().unwrap().is_empty(), "{m}");
    assert!(run.join("checkpoint/CURRENT").is_file());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    finish(&a, &run);
    same(&reference, &run, &format!("SIGTERM at step {step}"));
}

/// A collaborative run stopped by SIGTERM after its first epoch's checkpoint exits with 143
/// and resumes to the uninterrupted run's result.
#[test]
fn a_cf_run_stopped_by_sigterm_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, run, a, _) = sigterm_against_reference(
        &|run: &Path| train_mf_args(run, 400, 1000),
        tmp.path(),
        "checkpoint/CURRENT",
    );
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let epochs = metrics(&run)["curve"].as_array().unwrap().len();
    assert!((1..400).contains(&epochs), "stopped after {epochs} epochs");
    finish(&a, &run);
    same(&reference, &run, &format!("SIGTERM after epoch {epochs}"));
}

/// `--force` builds the replacement aside and swaps it in at its first checkpoint: killed at
/// any crash point before that (or failing), it leaves the old run exactly as it was; killed
/// after, the next command that opens the run finds the new one (the swap finished). (A
/// replacement that fails with an error is covered in `collm_nn::run`'s tests.)
#[test]
fn a_killed_or_failed_force_keeps_the_run_it_was_replacing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = family().data();
    let args = |run: &Path, dim: &str| -> Vec<String> {
        [
            "train",
            "cf",
            "--model",
            "mf",
            "--data",
            s(&data),
            "--dim",
            dim,
            "--max-epochs",
            "3",
            "--patience",
            "100",
            "--quiet",
            "--out",
            s(run),
        ]
        .map(String::from)
        .to_vec()
    };
    let strs = |a: &[String]| a.iter().map(String::to_string).collect::<Vec<_>>();
    let old_run = tmp.path().join("old");
    ok(&strs(&args(&old_run, "8"))
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let new_run = tmp.path().join("new");
    ok(&strs(&args(&new_run, "4"))
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let (mut kept, mut replaced) = (0, 0);
    for n in 1.. {
        let run = tmp.path().join(format!("force-{n}"));
        copy_dir(&old_run, &run);
        let mut a = args(&run, "4");
        a.push("--force".into());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = collm(&a, Some(n));
        if o.status.success() {
            same(&new_run, &run, "an uninterrupted --force");
            break;
        }
        assert!(o.status.code().is_none(), "crash point {n}: {o:?}");
        // The next writer recovers what the kill left: resume (the old run, or the new one
        // once it had a checkpoint) to the end.
        let mut again = args(&run, "4");
        again.push("--resume".into());
        let g: Vec<&str> = again.iter().map(String::as_str).collect();
        let o = collm(&g, None);
        if o.status.success() {
            same(&new_run, &run, &format!("crash point {n}, then --resume"));
            replaced += 1;
        } else {
            // Still the old run (dim 8): resuming it with dim 4 is refused, and it is intact.
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("differs"),
                "{o:?}"
            );
            same(&old_run, &run, &format!("crash point {n}"));
            kept += 1;
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with(&format!(".force-{n}.")) && !f.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "crash point {n}: left {leftovers:?}");
    }
    assert!(kept > 3 && replaced > 3, "kept {kept}, replaced {replaced}");
}

/// A disk that fills up under a `--force` replacement (a 3 MB tmpfs, mounted by the test as
/// root; skipped with a message where mounting is not allowed): the replacement fails with a
/// clear error and the old run is left as it was, then still evaluates.
#[test]
fn a_force_that_runs_out_of_disk_keeps_the_old_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = family().data();
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs", s(&disk)])
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&disk);
    let run = disk.join("mf");
    let train = |dim: &str, force: bool| {
        let mut a = vec![
            "train",
            "cf",
            "--model",
            "mf",
            "--data",
            s(&data),
            "--dim",
            dim,
            "--max-epochs",
            "2",
            "--quiet",
            "--out",
            s(&run),
        ];
        if force {
            a.push("--force");
        }
        common::collm(&a)
    };
    assert!(train("8", false).status.success());
    let before = weights(&run);
    let o = train("4096", true);
    assert!(!o.status.success(), "a 4096-wide MF fitted in 3 MB?");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("No space left") || e.contains("write error") || e.contains("cannot"),
        "{e}"
    );
    assert_eq!(weights(&run), before, "the old run changed");
    let o = common::collm(&[
        "eval",
        "cf",
        "--run",
        s(&run),
        "--data",
        s(&data),
        "--split",
        "valid",
    ]);
    assert!(o.status.success(), "{o:?}");
}
