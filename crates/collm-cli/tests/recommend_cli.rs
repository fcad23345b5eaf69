//! `collm score`, `collm rank` and `collm serve` from the command line, on tiny runs of both
//! kinds (MF; CoLLM-MF over a tiny random backbone): scores in input order equal to
//! whole-prompt scoring, bad pair files refused by file:line, ranking metrics and lists, a
//! user's recommendations, and a server that answers and exits 0 on SIGTERM.

mod common;

use collm::experiment::Mode;
use collm::recommend::Recommender;
use collm::testing::{Family, Spec};
use collm_cf::ModelKind;
use collm_data::sources::synthetic::SyntheticOptions;
use common::{fails, ok, s};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Runs a command that prints one JSON value.
fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

/// The runs every test reads: a dataset (24 users), an MF run, step 1 and CoLLM-MF, trained once.
struct Runs {
    data: PathBuf,
    mf: PathBuf,
    run: PathBuf,
}

fn runs() -> Runs {
    static F: OnceLock<Family> = OnceLock::new();
    let f = F.get_or_init(|| {
        Family::build(Spec {
            data: SyntheticOptions {
                users: 24,
                items: 30,
                rows_per_user: 6.0,
                seed: 4,
                ..Default::default()
            },
            cf_epochs: 2,
            warmup_steps: Some(1),
            eval_batch_size: Some(4),
            ..Spec::default()
        })
        .unwrap()
    });
    Runs {
        data: f.data(),
        mf: f.cf_run(ModelKind::Mf),
        run: f.run(Mode::Collm),
    }
}

/// The pairs file the score tests read (a header, both separators, a comment, a blank line,
/// a repeated pair).
fn pairs(root: &Path) -> PathBuf {
    let pairs = root.join("pairs.tsv");
    std::fs::write(
        &pairs,
        "uid\tiid\n3\t5\n1 2\n3 7\n# a comment\n\n2\t5\n3 5\n",
    )
    .unwrap();
    pairs
}

#[test]
fn score_keeps_input_order_and_equals_whole_prompt_scoring() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Runs { run, .. } = runs();
    let pairs = pairs(root);
    let out = root.join("scores.tsv");
    ok(&[
        "score",
        "--run",
        s(&run),
        "--input",
        s(&pairs),
        "--out",
        s(&out),
        "--quiet",
    ]);
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "uid\tiid\tscore\tprob");
    let got: Vec<(u32, u32, f64, f64)> = lines[1..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    let order: Vec<(u32, u32)> = got.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(order, [(3, 5), (1, 2), (3, 7), (2, 5), (3, 5)]);
    let rec = Recommender::open(&run, None).unwrap();
    let rows: Vec<_> = order
        .iter()
        .map(|&(u, i)| rec.user(u64::from(u)).unwrap().row(i))
        .collect();
    let want = rec.score_rows_full(&rows, false).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g.2 - w).abs() < 1e-4, "{g:?} vs {w}");
        assert!((g.3 - 1.0 / (1.0 + (-g.2).exp())).abs() < 1e-9);
    }
    assert!((got[0].2 - got[4].2).abs() < 1e-6);
}

/// `--split valid` scores each pair in its own valid row's context: the scores `collm eval
/// --split valid` gives, so the same AUC; without it, a known user's latest history (which
/// holds later positives) gives other scores. A pair that is not a row of the split is refused
/// by line.
#[test]
fn score_with_split_equals_eval_and_names_pairs_outside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let Runs { run, .. } = runs();
    let rec = Recommender::open(&run, None).unwrap();
    let valid = rec.dataset.split("valid").unwrap().rows.clone();
    let pairs = tmp.path().join("valid.tsv");
    let mut text = String::from("uid\tiid\n");
    for r in &valid {
        text.push_str(&format!("{}\t{}\n", r.uid, r.iid));
    }
    std::fs::write(&pairs, text).unwrap();
    let score = |split: Option<&str>| -> Vec<f64> {
        let out = tmp.path().join(format!("s-{split:?}.tsv"));
        let mut a = vec![
            "score",
            "--run",
            s(&run),
            "--input",
            s(&pairs),
            "--out",
            s(&out),
            "--quiet",
        ];
        if let Some(sp) = split {
            a.extend(["--split", sp]);
        }
        ok(&a);
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split('\t').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let in_split = score(Some("valid"));
    let labels: Vec<u8> = valid.iter().map(|r| r.label).collect();
    let auc = collm_metrics::auc(&labels, &in_split).unwrap();
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "collm",
        "--run",
        s(&run),
        "--split",
        "valid",
        "--json",
    ]))
    .unwrap();
    assert!(
        (auc - eval["auc"].as_f64().unwrap()).abs() < 1e-9,
        "{auc} vs {eval}"
    );
    let latest = score(None);
    assert!(
        in_split
            .iter()
            .zip(&latest)
            .any(|(a, b)| (a - b).abs() > 1e-6),
        "the latest history changed no score"
    );
    // A pair outside the split.
    let outside = tmp.path().join("outside.tsv");
    std::fs::write(&outside, "uid iid\n1 1\n1 2\n1 3\n1 4\n1 5\n1 6\n1 7\n").unwrap();
    fails(
        &[
            "score",
            "--run",
            s(&run),
            "--input",
            s(&outside),
            "--out",
            s(&tmp.path().join("o.tsv")),
            "--split",
            "valid",
        ],
        &["outside.tsv:", "is not a row of split 'valid'"],
    );
}

#[test]
fn a_collaborative_run_scores_with_its_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Runs { data, mf, .. } = runs();
    let pairs = pairs(root);
    let cf_out = root.join("cf.tsv");
    ok(&[
        "score",
        "--run",
        s(&mf),
        "--data",
        s(&data),
        "--input",
        s(&pairs),
        "--out",
        s(&cf_out),
    ]);
    assert_eq!(std::fs::read_to_string(&cf_out).unwrap().lines().count(), 6);
    fails(
        &[
            "score",
            "--run",
            s(&mf),
            "--input",
            s(&pairs),
            "--out",
            s(&cf_out),
        ],
        &["needs its dataset (--data)"],
    );
}

#[test]
fn bad_pair_files_are_refused_by_file_and_line_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Runs { run, .. } = runs();
    let bad = root.join("bad.tsv");
    let gone = root.join("none.tsv");
    for (body, expect) in [
        ("1 2\n3 x\n", "bad.tsv:2: field 'iid' is not an id: \"x\""),
        (
            "1 2\n999 2\n",
            "bad.tsv:2: unknown user 999: user ids run from 1 to 24",
        ),
        (
            "1 2\n1 0\n",
            "bad.tsv:2: unknown item 0: item ids run from 1 to",
        ),
        ("1 2 3\n", "bad.tsv:1: expected 2 fields `uid iid`, found 3"),
        ("# nothing\n", "no `uid iid` pair found"),
    ] {
        std::fs::write(&bad, body).unwrap();
        fails(
            &[
                "score",
                "--run",
                s(&run),
                "--input",
                s(&bad),
                "--out",
                s(&gone),
            ],
            &[expect],
        );
        assert!(!gone.exists());
    }
}

#[test]
fn rank_split_gives_metrics_in_range_lists_and_repeats_with_its_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Runs { data, mf, run } = runs();
    let lists = root.join("lists.tsv");
    let j = json(&[
        "rank",
        "--run",
        s(&run),
        "--split",
        "test",
        "--candidates",
        "8",
        "--k",
        "3",
        "--json",
        "--out",
        s(&lists),
        "--quiet",
    ]);
    for key in ["hr@3", "ndcg@3", "mrr"] {
        let x = j[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{key} = {x}");
    }
    assert!(j["ndcg@3"].as_f64().unwrap() <= j["hr@3"].as_f64().unwrap());
    let cases = j["cases"].as_u64().unwrap() as usize;
    assert!(cases > 0 && j["users"].as_u64().unwrap() > 0);
    assert_eq!(
        (j["k"].as_u64(), j["candidates"].as_u64()),
        (Some(3), Some(8))
    );
    let mean = j["mean_candidates"].as_f64().unwrap();
    let listed = std::fs::read_to_string(&lists).unwrap().lines().count() - 1;
    assert!((listed as f64 - mean * cases as f64).abs() < 1e-6);
    // The same seed samples the same candidates: the same numbers again; a CF run ranks too.
    let again = json(&[
        "rank",
        "--run",
        s(&run),
        "--split",
        "test",
        "--candidates",
        "8",
        "--k",
        "3",
        "--json",
        "--quiet",
    ]);
    assert_eq!(j, again);
    let cf = json(&[
        "rank",
        "--run",
        s(&mf),
        "--data",
        s(&data),
        "--split",
        "test",
        "--candidates",
        "8",
        "--k",
        "3",
        "--json",
        "--quiet",
    ]);
    assert_eq!(cf["cases"], j["cases"]);
}

#[test]
fn rank_user_lists_the_best_unseen_items() {
    let Runs { run, .. } = runs();
    let rec = Recommender::open(&run, None).unwrap();
    let top = ok(&[
        "rank",
        "--run",
        s(&run),
        "--user",
        "3",
        "--k",
        "4",
        "--quiet",
    ]);
    let rows: Vec<&str> = top.lines().collect();
    assert_eq!(rows[0], "rank\titem\tscore\ttitle");
    assert_eq!(rows.len(), 5);
    let user = rec.user(3).unwrap();
    for r in &rows[1..] {
        let item: u32 = r.split('\t').nth(1).unwrap().parse().unwrap();
        assert!(!user.seen.contains(&item));
    }
    fails(
        &["rank", "--run", s(&run), "--user", "999"],
        &["unknown user 999"],
    );
    fails(&["rank", "--run", s(&run)], &["give --split NAME"]);
}

#[test]
fn serve_answers_then_exits_0_on_sigterm_and_on_sighup() {
    for signal in ["-TERM", "-HUP"] {
        let Runs { run, .. } = runs();
        let rec = Recommender::open(&run, None).unwrap();
        let want = rec.score(&rec.user(3).unwrap(), &[5, 7]).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_collm"))
            .args(["serve", "--run", s(&run), "--addr", "127.0.0.1:0"])
            .env("COLLM_LOG", "error")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("{line:?}"))
            .to_string();
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        let body = "{\"user\": 3, \"items\": [5, 7]}";
        write!(
        conn,
        "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let json: serde_json::Value =
            serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert!((json["scores"][0].as_f64().unwrap() - want[0]).abs() < 1e-4);
        let killed = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "collm serve after {signal}: {status:?}"
        );
    }
}

/// Under `ulimit -n 128`, 200 idle connections do not starve `/health` or a request: the
/// server keeps its connections below the file-descriptor limit with a reserve, closing the
/// oldest idle one to make room (before, accept failed with "Too many open files" and health
/// went unanswered for the 10 s of the header timeout).
#[test]
fn serve_under_a_low_fd_limit_still_answers_with_many_idle_connections() {
    let Runs { run, .. } = runs();
    let mut child = Command::new("bash")
        .args([
            "-c",
            "ulimit -n 128 && exec \"$0\" serve --run \"$1\" --addr 127.0.0.1:0",
            env!("CARGO_BIN_EXE_collm"),
            s(&run),
        ])
        .env("COLLM_LOG", "error")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A failing assertion must not leave the server running.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
    let guard = Kill(child.id());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ask = |req: &str| -> (std::time::Duration, String) {
        let t = std::time::Instant::now();
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(8)))
            .unwrap();
        conn.write_all(req.as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = conn.read_to_string(&mut reply);
        (t.elapsed(), reply)
    };
    let (took, reply) = ask("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{reply:?} after {took:?}"
    );
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    let body = "{\"user\": 3, \"items\": [5]}";
    let (took, reply) = ask(&format!(
        "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{reply:?} after {took:?}"
    );
    drop(idle);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::mem::forget(guard);
}
