//! The ML-1M table's driver (`scripts/ml1m_table.sh`) on a tiny table: a copy of the script in a
//! temporary git repository with four tiny rows (MF, TALLRec, CoLLM-MF over both, an MF seed
//! row) on the tiny family's data and backbone. It stops at its first failure without marking anything done or
//! losing a checkpoint, leaves nothing behind that `git add` would pick up, commits each row's
//! paths and only those, and a fresh clone of whatever it last committed, killed at any moment,
//! resumes to the uninterrupted table's results.

mod common;

use collm::testing::{Family, Spec};
use collm_data::sources::synthetic::SyntheticOptions;
use common::{metrics, s};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

const ROWS: [&str; 4] = ["cf-mf", "tallrec", "collm-mf", "cf-mf-s1"];

fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            data: SyntheticOptions {
                users: 30,
                items: 24,
                rows_per_user: 6.0,
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

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn git(repo: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args(args)
        .current_dir(repo)
        .envs(git_env())
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

fn git_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("GIT_AUTHOR_NAME", "driver test"),
        ("GIT_AUTHOR_EMAIL", "driver@test"),
        ("GIT_COMMITTER_NAME", "driver test"),
        ("GIT_COMMITTER_EMAIL", "driver@test"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
    ]
}

/// A git repository holding the driver, its row-table script and a tiny table's configs (the
/// CoLLM row reads the other two by their paths under results/ml-1m, as the real ones do).
fn make_repo(dir: &Path) -> PathBuf {
    let f = family();
    let repo = dir.to_path_buf();
    std::fs::create_dir_all(repo.join("scripts")).unwrap();
    std::fs::create_dir_all(repo.join("configs/ml-1m")).unwrap();
    for p in [
        "scripts/ml1m_table.sh",
        "scripts/ml1m_table_rows.py",
        ".gitignore",
    ] {
        std::fs::copy(root().join(p), repo.join(p)).unwrap();
    }
    std::fs::write(
        repo.join("configs/ml-1m/rows"),
        format!("# a tiny table\n{TINY_ROWS}"),
    )
    .unwrap();
    std::fs::write(
        repo.join("configs/ml-1m/cf-mf.toml"),
        "model = \"mf\"\ndim = 8\nmax_epochs = 6\npatience = 100\nseed = 7\n",
    )
    .unwrap();
    let llm = |mode: &str, refs: &str| {
        format!(
            "mode = \"{mode}\"\nseed = 3\n\n[data]\npath = {:?}\n\n[model]\nbackbone = {:?}\n{refs}\
             mapper_mult = 2\neval_batch_size = 8\n\n[training]\nmax_steps = 6\neval_every = 3\n\
             eval_rows = 16\nbatch_size = 4\nwarmup_steps = 1\nlr = 0.01\npatience = 5\n\
             checkpoint_minutes = 1e-9\n",
            s(&f.data()),
            s(&f.backbone())
        )
    };
    std::fs::write(repo.join("configs/ml-1m/tallrec.toml"), llm("tallrec", "")).unwrap();
    std::fs::write(
        repo.join("configs/ml-1m/collm-mf.toml"),
        llm(
            "collm",
            "cf_run = \"results/ml-1m/cf-mf\"\nstep1 = \"results/ml-1m/tallrec\"\n",
        ),
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "a tiny table"]);
    repo
}

/// The driver in `repo` (`scripts/ml1m_table.sh ARGS`), in its own process group, with the
/// collm binary `bin` and `env`.
fn driver(repo: &Path, args: &[&str], bin: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("bash");
    c.arg("scripts/ml1m_table.sh")
        .args(args)
        .current_dir(repo)
        .env("COLLM_BIN", bin)
        .env("COLLM_LOG", "error")
        .env("ML1M_DATA", family().data())
        .env("ML1M_POLL", "0.1")
        .env("ML1M_COMMIT_EVERY", "0")
        .envs(git_env())
        .envs(env.iter().copied())
        .process_group(0);
    c
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_collm"))
}

fn run_driver(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    driver(repo, args, &bin(), env).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn status(repo: &Path) -> String {
    let o = run_driver(repo, &["--status"], &[]);
    assert!(o.status.success(), "--status: {}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

fn row_state(repo: &Path, row: &str) -> String {
    status(repo)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(row))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string()
}

/// An evaluation report without wall-clock fields.
fn report(run: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-valid.json")).unwrap())
            .unwrap();
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| !k.contains("second"));
    }
    v
}

/// The uninterrupted table's results (metrics, evaluation), made once.
type Reference = (
    tempfile::TempDir,
    Vec<(serde_json::Value, serde_json::Value)>,
);
/// The uninterrupted table's repository (under its TempDir: `repo`) and results.
static REFERENCE: OnceLock<Reference> = OnceLock::new();

fn reference() -> &'static Vec<(serde_json::Value, serde_json::Value)> {
    &REFERENCE
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let repo = make_repo(&tmp.path().join("repo"));
            let o = run_driver(&repo, &["--no-commit"], &[]);
            assert!(o.status.success(), "{}", text(&o));
            let r = results(&repo);
            (tmp, r)
        })
        .1
}

fn results(repo: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    ROWS.iter()
        .map(|r| {
            let d = repo.join("results/ml-1m").join(r);
            (metrics(&d), report(&d))
        })
        .collect()
}

/// Hidden files (temporaries, locks) that git tracks or would add (untracked, not ignored).
fn hidden_paths_git_sees(repo: &Path) -> Vec<String> {
    let status = git(repo, &["status", "--porcelain", "--untracked-files=all"]);
    let tracked = git(repo, &["ls-files"]);
    status
        .lines()
        .map(|l| &l[3..])
        .chain(tracked.lines())
        .filter(|p| {
            p.split('/')
                .any(|c| c.starts_with('.') && c != ".gitignore")
        })
        .map(String::from)
        .collect()
}

#[test]
fn a_killed_training_stops_the_driver_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&tmp.path().join("repo"));
    // The first collm process the driver runs is cf-mf's training: abort it at a crash point
    // after its first checkpoint (an out-of-memory kill would look the same).
    let o = run_driver(&repo, &["--no-commit"], &[("COLLM_CRASH_AT", "14")]);
    assert!(!o.status.success(), "the driver went on: {}", text(&o));
    assert!(text(&o).contains("cf-mf: training failed"), "{}", text(&o));
    let run = repo.join("results/ml-1m/cf-mf");
    assert!(!run.join("eval-valid.json").exists(), "marked done");
    assert!(run.join("checkpoint/CURRENT").exists(), "checkpoint lost");
    assert_eq!(row_state(&repo, "cf-mf"), "partial");
    // --status says how far the row got against its config's budget, and its best so far.
    let line = status(&repo)
        .lines()
        .find(|l| l.starts_with("cf-mf "))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains(" of 6, best valid AUC 0.") && line.contains(" s/epoch lately"),
        "{line}"
    );
    assert!(
        !repo.join("results/ml-1m/tallrec").exists(),
        "went on to the next row"
    );
    // Run again: it resumes and ends where an uninterrupted driver does.
    let o = run_driver(&repo, &["--no-commit"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(&results(&repo), reference());
}

#[test]
fn a_failed_evaluation_marks_nothing_done_and_status_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&tmp.path().join("repo"));
    // A collm whose evaluation prints half a report and fails.
    let wrapper = tmp.path().join("collm-eval-fails");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = eval ]; then printf '{{\"auc\": 0.'; exit 3; fi\nexec {:?} \"$@\"\n",
            s(&bin())
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let o = driver(&repo, &["--no-commit"], &wrapper, &[])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cf-mf: evaluation failed"),
        "{}",
        text(&o)
    );
    let run = repo.join("results/ml-1m/cf-mf");
    assert!(!run.join("eval-valid.json").exists());
    assert!(
        run.join("checkpoint/CURRENT").exists(),
        "checkpoint dropped"
    );
    assert_eq!(row_state(&repo, "cf-mf"), "trained");
    // An empty report left by an older driver is not "done" either, and breaks nothing.
    std::fs::write(run.join("eval-valid.json"), "").unwrap();
    assert_eq!(row_state(&repo, "cf-mf"), "trained");
    let t = run_driver(&repo, &["--table"], &[]);
    assert!(t.status.success(), "--table: {}", text(&t));
    // No temporary report is left behind.
    assert!(hidden_paths_git_sees(&repo).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("results/ml-1m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".eval-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let o = run_driver(&repo, &["--no-commit"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(&results(&repo), reference());
}

/// What each commit after the first touches: only the paths of one row.
/// Is `repo`'s last commit a row's checkpoint (the driver commits a row in progress)? Read
/// while the driver runs: a failed read is a no.
/// Installs a git `reference-transaction` hook in `repo` that, once a checkpoint commit (a row
/// in progress, or trained with its evaluation to do) has landed (the driver commits with `update-ref`, which runs this hook and no other), kills the
/// hook's process group (the driver's: git and its hooks are the driver's children) with
/// SIGKILL, once: the hook removes itself first.
fn kill_at_first_checkpoint_commit(repo: &Path) {
    let hook = repo.join(".git/hooks/reference-transaction");
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    std::fs::write(
        &hook,
        r#"#!/usr/bin/env bash
[ "$1" = committed ] || exit 0
while read -r old new ref; do
  case "$(git log -1 --format=%s "$new" 2>/dev/null)" in
    *" in progress "*|*" trained "*)
      rm -f "$0"
      read -r _ _ _ _ pgid _ < /proc/$$/stat
      kill -9 -- "-$pgid" ;;
  esac
done
exit 0
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn last_commit_is_a_checkpoint(repo: &Path) -> bool {
    Command::new("git")
        .args(["log", "-1", "--format=%s"])
        .current_dir(repo)
        .envs(git_env())
        .output()
        .is_ok_and(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.contains(" in progress ") || s.contains(" trained ")
        })
}

fn commits_touch_one_row_each(repo: &Path) -> usize {
    let log = git(repo, &["log", "--format=%H", "--skip=0"]);
    let commits: Vec<&str> = log.lines().collect();
    for c in &commits[..commits.len() - 1] {
        let files = git(repo, &["show", "--name-only", "--format=", c]);
        let rows: std::collections::BTreeSet<&str> = files
            .lines()
            .map(|f| {
                let rest = f
                    .strip_prefix("results/ml-1m/")
                    .unwrap_or_else(|| panic!("commit {c} touches {f}"));
                let name = rest.split('/').next().unwrap();
                name.strip_suffix(".driver.log").unwrap_or(name)
            })
            .collect();
        assert_eq!(rows.len(), 1, "commit {c} touches {rows:?}");
    }
    commits.len() - 1
}

#[test]
fn the_driver_commits_rows_and_a_clone_of_any_moment_resumes_to_the_same_table() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted, committing: each row lands in a final commit of its own paths, the
    // checkpoint commits before it replaced.
    let whole = make_repo(&tmp.path().join("whole"));
    let t = Instant::now();
    let o = run_driver(&whole, &["--commit"], &[]);
    let total = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(&results(&whole), reference());
    assert_eq!(
        commits_touch_one_row_each(&whole),
        ROWS.len(),
        "{}",
        text(&o)
    );
    // A seed row keeps its config, metrics and evaluation, not its weights.
    let s1 = whole.join("results/ml-1m/cf-mf-s1");
    assert!(s1.join("eval-valid.json").is_file() && s1.join("metrics.json").is_file());
    assert!(!s1.join("model.safetensors").exists());
    assert!(whole
        .join("results/ml-1m/cf-mf/model.safetensors")
        .is_file());
    assert!(text(&o).contains("replacing this driver's last checkpoint commit"));
    let left = git(&whole, &["status", "--porcelain"]);
    assert!(left.trim().is_empty(), "left uncommitted: {left}");

    // Killed (kill -9, the whole process group): first right after its first checkpoint
    // commit (by a git hook, so that a clone starts from a row in progress however fast or
    // loaded the machine is), then at spread-out moments; after each kill a fresh clone of the
    // last commit resumes to the same table, and so does the killed repository.
    let repo = make_repo(&tmp.path().join("killed"));
    kill_at_first_checkpoint_commit(&repo);
    let kills = 5;
    let mut seen = String::new(); // the clones' --status before they resumed
    for k in 0..kills {
        let mut child = driver(&repo, &["--commit"], &bin(), &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if k == 0 {
            let t = Instant::now();
            while child.try_wait().unwrap().is_none() && t.elapsed() < 4 * total {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        } else {
            std::thread::sleep(total.mul_f64((k as f64 + 0.7) / (kills as f64 + 1.0)));
        }
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", child.id())])
            .status();
        child.wait().unwrap();
        if k == 0 {
            assert!(
                last_commit_is_a_checkpoint(&repo),
                "the first kill came after no checkpoint commit: {}",
                git(&repo, &["log", "--format=%s"])
            );
            // A trained row is committed without its last checkpoint (evaluation reads best/).
            let subject = git(&repo, &["log", "-1", "--format=%s"]);
            if subject.contains(" trained ") {
                let files = git(&repo, &["show", "--name-only", "--format=", "HEAD"]);
                assert!(files.contains("/best/"), "{subject}: {files}");
                assert!(!files.contains("/checkpoint/"), "{subject}: {files}");
            }
        }
        // A git command killed mid-way leaves its lock (the index's, or HEAD's or a branch's
        // from an update-ref: the driver then waits for it as for a live git command); a new
        // machine would not have them.
        remove_git_locks(&repo.join(".git"));
        assert!(
            hidden_paths_git_sees(&repo).is_empty(),
            "kill {k}: {:?}",
            hidden_paths_git_sees(&repo)
        );
        let clone = tmp.path().join(format!("clone-{k}"));
        let o = Command::new("git")
            .args(["clone", "-q", s(&repo), s(&clone)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        seen.push_str(&status(&clone));
        let o = run_driver(&clone, &["--commit"], &[]);
        assert!(o.status.success(), "clone after kill {k}: {}", text(&o));
        assert_eq!(&results(&clone), reference(), "clone after kill {k}");
        commits_touch_one_row_each(&clone);
    }
    // The clones resumed from committed checkpoints, trained rows and finished rows, not from
    // scratch.
    assert!(
        seen.contains(" partial ") || seen.contains(" trained "),
        "{seen}"
    );
    for l in seen
        .lines()
        .filter(|l| l.contains(" partial ") || l.contains(" trained "))
    {
        assert!(l.contains(" of 6") || l.contains("no metrics yet"), "{l}");
    }
    assert!(seen.contains(" done "), "{seen}");
    let o = run_driver(&repo, &["--commit"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(&results(&repo), reference());
    commits_touch_one_row_each(&repo);
    assert!(hidden_paths_git_sees(&repo).is_empty());
}

/// Bytes of the files in `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// Bytes that results/ holds in git at commit `c`.
fn results_bytes_at(repo: &Path, c: &str) -> u64 {
    git(repo, &["ls-tree", "-r", "-l", c, "--", "results"])
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The weights files row `row` holds at HEAD.
fn weights_at_head(repo: &Path, row: &str) -> Vec<String> {
    git(
        repo,
        &[
            "ls-tree",
            "-r",
            "--name-only",
            "HEAD",
            "--",
            &format!("results/ml-1m/{row}"),
        ],
    )
    .lines()
    .filter(|f| f.ends_with(".safetensors"))
    .map(String::from)
    .collect()
}

fn set_rows(repo: &Path, rows: &str) {
    std::fs::write(repo.join("configs/ml-1m/rows"), rows).unwrap();
    git(
        repo,
        &["commit", "-q", "-m", "rows", "--", "configs/ml-1m/rows"],
    );
}

const TINY_ROWS: &str =
    "cf-mf cf cf-mf\ntallrec llm tallrec\ncollm-mf llm collm-mf\ncf-mf-s1 cf cf-mf 1\n";

#[test]
fn no_commit_takes_results_over_the_budget_and_no_weights_rows_ship_none() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&tmp.path().join("repo"));
    let start = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    // A budget with room for the finished MF row (as the uninterrupted table left it, give or
    // take its logs' digits) and not for the LLM row after it: TALLRec's trained state is not
    // committed, its finished row would take results/ over and stops the driver, kept done in
    // the work tree.
    reference();
    let ref_dir = REFERENCE.get().unwrap().0.path().join("repo/results/ml-1m");
    let budget = (dir_bytes(&ref_dir.join("cf-mf")) + 300) as f64 / 1e6;
    let budget = format!("{budget}");
    let o = run_driver(&repo, &["--commit"], &[("ML1M_BUDGET_MB", &budget)]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("tallrec: its trained state is not committed"),
        "{out}"
    );
    assert!(
        out.contains("tallrec: not committed: results/ would hold"),
        "{out}"
    );
    assert_eq!(row_state(&repo, "tallrec"), "done");
    let tree = git(&repo, &["ls-tree", "--name-only", "HEAD", "results/ml-1m/"]);
    assert_eq!(tree.trim(), "results/ml-1m/cf-mf", "{out}");
    for c in git(&repo, &["rev-list", &format!("{start}..HEAD")]).lines() {
        assert!(results_bytes_at(&repo, c) as f64 <= budget.parse::<f64>().unwrap() * 1e6);
    }

    // A row marked no-weights that another row trains over: refused before anything runs.
    set_rows(
        &repo,
        &TINY_ROWS.replace("tallrec llm tallrec", "tallrec llm tallrec no-weights"),
    );
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let o = run_driver(&repo, &["--commit"], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("row tallrec is marked no-weights, but configs/ml-1m/collm-mf.toml"),
        "{}",
        text(&o)
    );
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    set_rows(&repo, TINY_ROWS);

    // Within the budget (60 MB): the finished row that was not committed is committed first,
    // and the table goes on to the uninterrupted table's results.
    let o = run_driver(&repo, &["--commit"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("tallrec: finished but not committed: committing it"),
        "{out}"
    );
    assert_eq!(&results(&repo), reference());
    assert!(git(&repo, &["status", "--porcelain", "results"])
        .trim()
        .is_empty());
    assert!(!weights_at_head(&repo, "collm-mf").is_empty());
    assert!(weights_at_head(&repo, "cf-mf-s1").is_empty());

    // CoLLM-MF marked no-weights once finished: the next start drops its weights and commits
    // that; its evaluation, scores and the weights' recorded hashes stay, and neither a
    // further start nor --scores evaluates it again.
    set_rows(
        &repo,
        &TINY_ROWS.replace("collm-mf llm collm-mf", "collm-mf llm collm-mf no-weights"),
    );
    let before = results_bytes_at(&repo, "HEAD");
    let best_tree = |c: &str| git(&repo, &["ls-tree", "-r", c, "results/ml-1m/collm-mf/best"]);
    let shipped = best_tree("HEAD");
    let o = run_driver(&repo, &["--commit"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("collm-mf: its weights dropped"), "{out}");
    assert!(weights_at_head(&repo, "collm-mf").is_empty());
    assert!(results_bytes_at(&repo, "HEAD") < before);
    let kept = git(
        &repo,
        &[
            "ls-tree",
            "-r",
            "--name-only",
            "HEAD",
            "results/ml-1m/collm-mf",
        ],
    );
    for f in [
        "eval-valid.json",
        "scores-valid.tsv.gz",
        "metrics.json",
        "best/weights.sha256.json",
    ] {
        assert!(kept.contains(&format!("collm-mf/{f}")), "{f}: {kept}");
    }
    assert_eq!(&results(&repo), reference());
    let head = git(&repo, &["rev-parse", "HEAD"]);
    for args in [&["--commit"][..], &["--commit", "--scores"][..]] {
        let o = run_driver(&repo, args, &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(!text(&o).contains("evaluating"), "{args:?}: {}", text(&o));
        assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    }
    assert!(git(&repo, &["status", "--porcelain", "results"])
        .trim()
        .is_empty());

    // The mark taken back: the next start brings the weights back from git history, checked
    // against the hashes the row recorded. A recorded hash the history's file does not have:
    // refused by name, nothing restored or committed.
    set_rows(&repo, TINY_ROWS);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let hashes = repo.join("results/ml-1m/collm-mf/best/weights.sha256.json");
    let recorded = std::fs::read_to_string(&hashes).unwrap();
    let v: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    let (file, sha) = v.as_object().unwrap().iter().next().unwrap();
    let sha = sha.as_str().unwrap();
    std::fs::write(&hashes, recorded.replace(sha, &"0".repeat(64))).unwrap();
    let o = run_driver(&repo, &["--commit"], &[]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "collm-mf: results/ml-1m/collm-mf/best/{file} as it was before"
        )) && out.contains("not restored"),
        "{out}"
    );
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    assert!(!repo.join("results/ml-1m/collm-mf/best").join(file).exists());
    assert!(hidden_paths_git_sees(&repo).is_empty());
    std::fs::write(&hashes, &recorded).unwrap();
    let o = run_driver(&repo, &["--commit"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("collm-mf: its weights restored from git history"),
        "{out}"
    );
    assert!(!out.contains("evaluating"), "{out}");
    assert_eq!(best_tree("HEAD"), shipped);
    assert_eq!(&results(&repo), reference());
    assert!(git(&repo, &["status", "--porcelain", "results"])
        .trim()
        .is_empty());
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let o = run_driver(&repo, &["--commit"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
}

/// `collm eval scores` on a file: its report without wall-clock fields.
fn scores_report(file: &Path) -> serde_json::Value {
    let o = Command::new(bin())
        .args([
            "eval",
            "scores",
            "--data",
            s(&family().data()),
            "--split",
            "valid",
        ])
        .args(["--scores", s(file), "--json"])
        .env("COLLM_LOG", "error")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A gzip-compressed text file's text.
fn read_gz(path: &Path) -> String {
    use std::io::Read;
    let mut out = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// A scores file as drivers before scores-valid.tsv.gz wrote it: each f32 score with the
/// digits of its f64.
fn long_digits(scores: &str) -> String {
    let mut out = String::new();
    for (k, line) in scores.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if k == 0 {
            out.push_str(line);
        } else {
            let x = f64::from(f[2].parse::<f32>().unwrap());
            out.push_str(&format!("{}\t{}\t{x}", f[0], f[1]));
        }
        out.push('\n');
    }
    out
}

#[test]
fn finished_rows_ship_their_scores_and_older_rows_get_them_back_when_they_reproduce() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&tmp.path().join("repo"));
    let o = run_driver(&repo, &["--commit"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    // Every finished row ships the scores its report was computed from.
    let dir = |r: &str| repo.join("results/ml-1m").join(r);
    let mut kept = Vec::new();
    for r in ROWS {
        let f = dir(r).join("scores-valid.tsv.gz");
        assert_eq!(scores_report(&f), report(&dir(r)), "{r}");
        kept.push(std::fs::read(&f).unwrap());
    }
    assert_eq!(
        git(
            &repo,
            &["ls-files", "results/ml-1m/collm-mf/scores-valid.tsv.gz"]
        )
        .trim(),
        "results/ml-1m/collm-mf/scores-valid.tsv.gz"
    );

    // Each start and evaluation names the build (the commit `collm --version` embeds).
    let version = String::from_utf8(
        Command::new(bin())
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let build = version
        .trim()
        .strip_suffix(')')
        .and_then(|v| v.split("(git ").nth(1))
        .unwrap_or_else(|| panic!("collm --version: {version}"));
    assert!(!build.is_empty() && build != "unknown", "{version}");
    for r in ["cf-mf", "collm-mf"] {
        let log = std::fs::read_to_string(dir(r).join("driver.log")).unwrap();
        assert!(log.contains(&format!(", build {build}")), "{r}: {log}");
        assert!(log.contains("evaluated on "), "{r}: {log}");
    }

    // --compare: the CoLLM row against the runs its config reads (its CF row and TALLRec),
    // beyond noise.
    let o = run_driver(&repo, &["--compare"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for base in ["cf-mf", "tallrec"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("| collm-mf | {base} | ")))
            .unwrap_or_else(|| panic!("no CoLLM-MF against {base}: {out}"));
        let want = report(&dir("collm-mf"))["auc"].as_f64().unwrap()
            - report(&dir(base))["auc"].as_f64().unwrap();
        assert!(
            line.contains(&format!("| {want:+.4} [")),
            "{line} (want {want:+.4})"
        );
    }
    // The header and CoLLM-MF's two: the other rows build on no row.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("| ")).count(),
        3,
        "{out}"
    );

    // Rows whose scores an older driver wrote uncompressed with each f32's f64 digits: the
    // driver writes them again as the file it writes now (the same bytes) and removes the old
    // one, in a commit of the row's paths, the report unchanged. A row whose old file does not
    // give its report keeps it (and gets its scores by evaluating it again, below) until a
    // later start finds its new file good.
    for r in ROWS {
        let gz = dir(r).join("scores-valid.tsv.gz");
        let old = long_digits(&read_gz(&gz));
        if r == "collm-mf" {
            assert!(old.len() > read_gz(&gz).len() * 5 / 4, "{old}");
        }
        std::fs::write(dir(r).join("scores-valid.tsv"), old).unwrap();
        std::fs::remove_file(&gz).unwrap();
    }
    std::fs::write(
        dir("tallrec").join("scores-valid.tsv"),
        "uid\tiid\tscore\n1\t1\t0.5\n",
    )
    .unwrap();
    git(&repo, &["add", "-A", "results"]);
    git(
        &repo,
        &["commit", "-q", "-m", "scores as an older driver wrote them"],
    );
    let before = git(&repo, &["rev-parse", "HEAD"]);
    let o = run_driver(&repo, &["--scores"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for (k, r) in ROWS.iter().enumerate() {
        let (gz, old) = (
            dir(r).join("scores-valid.tsv.gz"),
            dir(r).join("scores-valid.tsv"),
        );
        assert_eq!(std::fs::read(&gz).unwrap(), kept[k], "{r}");
        assert_eq!(old.exists(), *r == "tallrec", "{r}: {out}");
        let log = std::fs::read_to_string(dir(r).join("driver.log")).unwrap();
        assert_eq!(
            log.contains("written again as scores-valid.tsv.gz"),
            *r != "tallrec",
            "{r}: {log}"
        );
    }
    assert!(
        out.contains("tallrec: its scores written again do not give the same report"),
        "{out}"
    );
    let commits = git(
        &repo,
        &["log", "--format=%H", &format!("{}..HEAD", before.trim())],
    );
    assert_eq!(commits.lines().count(), 4, "{out}");
    let o = run_driver(&repo, &["--scores"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!dir("tallrec").join("scores-valid.tsv").exists());
    assert_eq!(
        std::fs::read(dir("tallrec").join("scores-valid.tsv.gz")).unwrap(),
        kept[1]
    );
    let commits = git(
        &repo,
        &["log", "--format=%H", &format!("{}..HEAD", before.trim())],
    );
    assert_eq!(commits.lines().count(), 5, "{}", text(&o));
    assert!(git(&repo, &["status", "--porcelain"]).trim().is_empty());

    // Rows finished before the driver kept scores: drop them, as a commit of someone else's,
    // with TALLRec's report far from what its weights give and CoLLM-MF's a little off (as
    // an older build's bf16 kernel leaves it).
    for r in ROWS {
        std::fs::remove_file(dir(r).join("scores-valid.tsv.gz")).unwrap();
    }
    let nudge = |r: &str, by: f64| {
        let p = dir(r).join("eval-valid.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["auc"] = serde_json::json!(v["auc"].as_f64().unwrap() + by);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    nudge("tallrec", 0.01);
    nudge("collm-mf", 1e-4);
    // CoLLM-MF's evaluation ran with a bf16 kernel on this machine (or f32, where it has none).
    // Where it is one, its log names the other (AMX for AVX512-BF16 and back), as a row
    // evaluated on another machine's: the same numerics, so this machine's kernel evaluates it.
    let log_path = dir("collm-mf").join("driver.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let bf16 = !log.contains(", kernel f32");
    let (here, other) = if log.contains(", kernel amx") {
        ("amx", "bf16")
    } else {
        ("bf16", "amx")
    };
    if bf16 {
        std::fs::write(
            &log_path,
            log.replace(&format!(", kernel {here}"), &format!(", kernel {other}")),
        )
        .unwrap();
    }
    git(&repo, &["add", "-A", "results"]);
    git(&repo, &["commit", "-q", "-m", "rows without scores"]);
    let before = git(&repo, &["rev-parse", "HEAD"]);

    let o = run_driver(&repo, &["--scores"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // MF gets the very scores it had (the same build: exactly); CoLLM-MF too where its
    // kernel is a bf16 one (within bf16's numerics across builds), each in a commit of its own
    // paths; TALLRec's report no longer matches its weights; the seed row has no weights.
    for (k, r) in ROWS.iter().enumerate() {
        let f = dir(r).join("scores-valid.tsv.gz");
        if *r == "cf-mf" || (*r == "collm-mf" && bf16) {
            assert_eq!(std::fs::read(&f).unwrap(), kept[k], "{r}");
            let log = std::fs::read_to_string(dir(r).join("driver.log")).unwrap();
            assert!(
                log.contains("scores-valid.tsv.gz written: evaluated again"),
                "{r}: {log}"
            );
            assert_eq!(
                log.contains("within bf16 numerics"),
                *r == "collm-mf",
                "{r}: {log}"
            );
            if *r == "collm-mf" {
                let last = log.lines().last().unwrap();
                assert!(last.contains(&format!(", kernel {here}: ")), "{last}");
            }
        } else {
            assert!(!f.exists(), "{r}");
        }
    }
    assert!(
        out.contains("tallrec: evaluating it again does not reproduce its eval-valid.json"),
        "{out}"
    );
    assert!(!out.contains("cf-mf-s1"), "{out}");
    let commits = git(
        &repo,
        &["log", "--format=%H", &format!("{}..HEAD", before.trim())],
    );
    let commits: Vec<&str> = commits.lines().collect();
    // MF's scores, CoLLM-MF's where bf16, and TALLRec's failed attempt, recorded in its log.
    assert_eq!(commits.len(), if bf16 { 3 } else { 2 }, "{out}");
    let tallrec_log = std::fs::read_to_string(dir("tallrec").join("driver.log")).unwrap();
    assert!(
        tallrec_log
            .lines()
            .last()
            .unwrap()
            .contains("scores not kept: evaluated again on "),
        "{tallrec_log}"
    );
    for c in commits {
        let files = git(&repo, &["show", "--name-only", "--format=", c]);
        assert!(
            files
                .lines()
                .all(|f| f.ends_with("/scores-valid.tsv.gz") || f.ends_with("/driver.log")),
            "{files}"
        );
    }
    assert!(git(&repo, &["status", "--porcelain"]).trim().is_empty());
    assert!(hidden_paths_git_sees(&repo).is_empty());

    // A collaborative row must reproduce exactly: MF's report a little off gets no scores.
    std::fs::remove_file(dir("cf-mf").join("scores-valid.tsv.gz")).unwrap();
    nudge("cf-mf", 1e-4);
    git(&repo, &["add", "-A", "results"]);
    git(&repo, &["commit", "-q", "-m", "MF a little off"]);
    // --scores evaluates TALLRec and MF again (neither reproduces) and commits only those
    // attempts' lines in their logs.
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let o = run_driver(&repo, &["--scores"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("cf-mf: evaluating it again does not reproduce"),
        "{out}"
    );
    assert!(out.contains("tallrec: evaluating again"), "{out}");
    assert!(!dir("cf-mf").join("scores-valid.tsv.gz").exists());
    let changed = git(&repo, &["diff", "--name-only", head.trim(), "HEAD"]);
    assert_eq!(
        changed.trim(),
        "results/ml-1m/cf-mf/driver.log\nresults/ml-1m/tallrec/driver.log"
    );
    // The driver's own pass after its last row does not spend evaluations on them again.
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let o = run_driver(&repo, &["--commit"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("evaluating"), "{out}");
    for r in ["cf-mf", "tallrec"] {
        assert!(
            out.contains(&format!(
                "{r}: its evaluation again did not reproduce its eval-valid.json before"
            )),
            "{out}"
        );
    }
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    assert!(git(&repo, &["status", "--porcelain"]).trim().is_empty());
}

/// Removes every `*.lock` file under `dir` (a `.git` directory): what git commands killed
/// mid-way leave behind.
fn remove_git_locks(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_git_locks(&p);
        } else if p.extension().is_some_and(|x| x == "lock") {
            std::fs::remove_file(&p).ok();
        }
    }
}

/// The rule that decides whether a row's evaluation again reproduces its committed report
/// (`ml1m_table_rows.py --reproduces`, which `--scores` applies): exactly for a collaborative
/// row, within 1e-5 for an LLM row on the f32 kernel, within AUC 1e-3 / UAUC 5e-3 on a bf16
/// kernel; a UAUC present on one side only never matches.
#[test]
fn a_row_reproduces_its_report_within_its_kernels_numerics() {
    let tmp = tempfile::tempdir().unwrap();
    let report = |name: &str, auc: f64, uauc: Option<f64>| {
        let p = tmp.path().join(name);
        std::fs::write(
            &p,
            serde_json::json!({"auc": auc, "uauc": uauc}).to_string(),
        )
        .unwrap();
        p
    };
    let old = report("old.json", 0.7229954815685015, Some(0.6501512993186526));
    let check = |auc: f64, uauc: Option<f64>, kernel: &str, kind: &str| {
        let new = report("new.json", auc, uauc);
        let o = Command::new("python3")
            .arg(root().join("scripts/ml1m_table_rows.py"))
            .args(["--reproduces", s(&old), s(&new), kernel, kind])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
    };
    let (a, u) = (0.7229954815685015, 0.6501512993186526);
    // The same numbers: every kind and kernel, saying nothing more.
    for (kernel, kind) in [("f32", "cf"), ("f32", "llm"), ("amx", "llm")] {
        let (ok, msg) = check(a + 5e-7, Some(u - 5e-7), kernel, kind);
        assert!(
            ok && msg == "AUC 0.722996, UAUC 0.650151",
            "{kernel} {kind}: {msg}"
        );
    }
    // CoLLM-MF evaluated again today on another Xeon (AUC 3.5e-7, UAUC 2.3e-6 off).
    let today = (0.7229951291746156, Some(0.6501490261780817));
    let (ok, msg) = check(today.0, today.1, "f32", "llm");
    assert!(ok, "{msg}");
    assert!(msg.ends_with("(committed 0.722995, 0.650151: within f32 numerics across builds)"));
    let (ok, msg) = check(today.0, today.1, "f32", "cf");
    assert!(
        !ok && msg.ends_with("(committed 0.722995, 0.650151)"),
        "{msg}"
    );
    // f32: 2e-5 is too far; bf16: 1e-4 / 4e-3 is within, 2e-3 on AUC is not.
    assert!(!check(a + 2e-5, Some(u), "f32", "llm").0);
    let (ok, msg) = check(a + 1e-4, Some(u - 4e-3), "amx", "llm");
    assert!(ok && msg.contains("within bf16 numerics"), "{msg}");
    assert!(!check(a + 2e-3, Some(u), "bf16", "llm").0);
    // A UAUC on one side only.
    assert!(!check(a, None, "f32", "llm").0);
}

/// `--status` on an LLM row in progress: its step of the config's budget, its best validation,
/// its pace and what is left of its budget at that pace.
#[test]
fn status_says_what_an_llm_row_in_progress_has_left() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(&tmp.path().join("repo"));
    let run = repo.join("results/ml-1m/tallrec");
    std::fs::create_dir_all(run.join("checkpoint")).unwrap();
    std::fs::write(run.join("checkpoint/CURRENT"), "00000001").unwrap();
    let line = |step: u64, secs: f64| {
        std::fs::write(
            run.join("metrics.json"),
            serde_json::json!({"kind": "tallrec", "step": step, "train_seconds": secs,
                "best_step": 2, "best_valid": {"auc": 0.61, "n": 16}, "curve": []})
            .to_string(),
        )
        .unwrap();
        status(&repo)
            .lines()
            .find(|l| l.starts_with("tallrec "))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        line(2, 7200.0),
        "tallrec          partial  step 2 of 6, best valid AUC 0.6100 at step 2 (16 rows), \
         3600.0 s/step so far (validations included), about 4.0 h to step 6 at that pace"
    );
    assert!(line(4, 2400.0).ends_with(", about 20 min to step 6 at that pace"));
    assert!(line(6, 1200.0).ends_with("s/step so far (validations included)"));
}

/// A README table row (`ml1m_table_rows.py`) names where the row trained and was evaluated, with
/// its kernels, not where it was evaluated again for its scores (`--scores`), and its wall time
/// is the driver's sessions or, where a session before the driver logged none, the trainer's.
#[test]
fn a_table_row_names_where_it_ran_not_where_its_scores_were_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("llm-row");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("eval-valid.json"),
        r#"{"auc": 0.71234, "uauc": 0.65, "subsets": {"warm": {"auc": 0.75}, "cold": {"auc": 0.6}}}"#,
    )
    .unwrap();
    let cfg = tmp.path().join("row.toml");
    std::fs::write(
        &cfg,
        "[experiment]\nmode = \"collm\"\n[experiment.training]\nmax_steps = 600\nbatch_size = 16\n",
    )
    .unwrap();
    let log = "2026-12-01T00:00:00Z start on CPU A (family 25 model 17, avx512), 2 cores, kernel bf16\n\
               2026-12-01T01:00:00Z trained 3600 s (stopped by a signal)\n\
               2026-12-01T02:00:00Z --resume on CPU B (family 6 model 207, avx512), 2 cores, kernel amx\n\
               2026-12-01T03:00:00Z trained 3600 s\n\
               2026-12-01T03:20:00Z evaluated on CPU B (family 6 model 207, avx512), 2 cores, build x, kernel amx\n\
               2026-12-02T00:00:00Z scores-valid.tsv written: evaluated again on CPU C (family 6 model 167, avx512), 2 cores, build y, kernel f32: AUC 0.712340, UAUC 0.650000\n\
               2026-12-02T01:00:00Z scores-valid.tsv written again as scores-valid.tsv.gz (the same report), build z\n";
    std::fs::write(run.join("driver.log"), log).unwrap();
    let table_row = |train_seconds: f64| {
        std::fs::write(
            run.join("metrics.json"),
            serde_json::json!({"step": 600, "best_step": 400, "train_seconds": train_seconds})
                .to_string(),
        )
        .unwrap();
        let o = Command::new("python3")
            .arg(root().join("scripts/ml1m_table_rows.py"))
            .args([s(&run), s(&cfg), "llm"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        table_row(6500.0),
        "| llm-row | 0.7123 | 0.6500 | 0.7500 | 0.6000 | 600 of 600 steps, batch 16 (best: step 400) \
         | 2.0 h | CPU A (family 25 model 17, avx512); CPU B (family 6 model 207, avx512); kernel amx, bf16 |"
    );
    // A first session by hand, before the driver logged "trained N s": the trainer's own time.
    assert!(table_row(10800.0).contains("| 3.0 h |"));
}

/// README's ML-1M table is what the driver's `--table` makes of `results/ml-1m/`, row for row
/// (rows the driver finished after README was last written may be missing at its end only).
#[test]
fn readme_table_is_the_drivers_table_of_the_shipped_rows() {
    let o = Command::new("bash")
        .arg("scripts/ml1m_table.sh")
        .arg("--table")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "--table: {}", text(&o));
    let made: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(str::to_string)
        .collect();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let header =
        "| row | valid AUC | valid UAUC | warm AUC | cold AUC | budget | wall time | machine |";
    let shown: Vec<String> = readme
        .lines()
        .skip_while(|l| *l != header)
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .map(str::to_string)
        .collect();
    assert!(
        !shown.is_empty(),
        "README has no ML-1M table under {header:?}"
    );
    assert!(
        shown.len() <= made.len(),
        "README shows rows that are not done"
    );
    for (r, m) in shown.iter().zip(&made) {
        assert_eq!(
            r, m,
            "README's row differs from scripts/ml1m_table.sh --table"
        );
    }
    if shown.len() < made.len() {
        eprintln!(
            "README lacks the rows finished since: {:?}",
            &made[shown.len()..]
        );
    }
}
