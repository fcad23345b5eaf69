//! `collm score`, `collm rank` and `collm serve` from the command line, on tiny runs of both
//! kinds (MF; CoLLM-MF over a tiny random backbone): scores in input order equal to
//! whole-prompt scoring, bad pair files refused by file:line, ranking metrics and lists, a
//! user's recommendations, and a server that answers and exits 0 on SIGTERM.

mod common;

use collm::recommend::Recommender;
use common::{fails, ok, s};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs a command that prints one JSON value.
fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

/// Dataset, MF run, step 1 and a CoLLM-MF run, all through the binary.
fn runs(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = root.join("data");
    ok(&[
        "data",
        "prepare",
        "synthetic",
        "--users",
        "24",
        "--items",
        "30",
        "--rows-per-user",
        "6",
        "--seed",
        "4",
        "--out",
        s(&data),
    ]);
    let mf = root.join("mf");
    ok(&[
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        s(&data),
        "--dim",
        "8",
        "--max-epochs",
        "2",
        "--quiet",
        "--out",
        s(&mf),
    ]);
    let backbone = root.join("backbone");
    collm_llm::testing::write_tiny_backbone(&backbone, 1).unwrap();
    let common = format!(
        "[data]\npath = {:?}\n[model]\nbackbone = {:?}\ncf_run = {:?}\nstep1 = {:?}\nmapper_mult = 2\neval_batch_size = 4\n\
[training]\nmax_steps = 2\neval_every = 2\neval_rows = 8\nbatch_size = 4\nwarmup_steps = 1\n",
        s(&data),
        s(&backbone),
        s(&mf),
        s(&root.join("step1"))
    );
    for (mode, out) in [("tallrec", "step1"), ("collm", "collm")] {
        let cfg = root.join(format!("{out}.toml"));
        std::fs::write(&cfg, format!("mode = \"{mode}\"\n{common}")).unwrap();
        ok(&[
            "train",
            "collm",
            "--config",
            s(&cfg),
            "--out",
            s(&root.join(out)),
            "--quiet",
        ]);
    }
    (data, mf, root.join("collm"))
}

#[test]
fn score_rank_and_serve_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, mf, run) = runs(root);

    // --- collm score: input order, any users; equal to whole-prompt scoring.
    let pairs = root.join("pairs.tsv");
    std::fs::write(
        &pairs,
        "uid\tiid\n3\t5\n1 2\n3 7\n# a comment\n\n2\t5\n3 5\n",
    )
    .unwrap();
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
    // A collaborative-model run scores the same file (with its dataset).
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

    // Bad pair files: named by file and line, nothing written.
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

    // --- collm rank --split: metrics in range, lists of every case.
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

    // --- collm rank --user: the best k unseen items, titled.
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

    // --- collm serve: answers, then SIGTERM drains and exits 0.
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
    assert!((json["scores"][0].as_f64().unwrap() - got[0].2).abs() < 1e-4);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "collm serve after SIGTERM: {status:?}"
    );
}
