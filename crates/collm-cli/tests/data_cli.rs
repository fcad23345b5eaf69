//! The `collm data` and `collm eval scores` commands end to end, with every bad input the
//! foundation issue lists: each must fail with an error naming the file, the line and what
//! was expected, and leave nothing behind.

mod common;

use common::{assert_contains, failure, ok, s};
use std::path::Path;

/// Nothing but `keep` is left in `dir` (no output, no temporary sibling).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "leftovers in {}", dir.display());
}

fn tsv_dir(dir: &Path, train: &str, items: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.tsv"), train).unwrap();
    std::fs::write(
        dir.join("valid.tsv"),
        "uid\tiid\tlabel\ttimestamp\thistory\n1\t2\t0\t5\t1\n2\t1\t1\t6\t\n",
    )
    .unwrap();
    std::fs::write(dir.join("items.tsv"), items).unwrap();
}

const GOOD_TRAIN: &str = "uid\tiid\tlabel\ttimestamp\thistory\n1\t1\t1\t1\t\n1\t2\t0\t2\t1\n2\t2\t1\t3\t\n2\t1\t0\t4\t2\n";
const GOOD_ITEMS: &[u8] = b"iid\ttitle\n1\tOne\n2\tTwo\n";

#[test]
fn prepare_stats_and_eval_scores_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    tsv_dir(&input, GOOD_TRAIN, GOOD_ITEMS);
    let out = tmp.path().join("ds");
    ok(&[
        "data",
        "prepare",
        "collm-tsv",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["data", "stats", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(stats["splits"]["train"]["rows"], 4);
    assert_eq!(stats["splits"]["valid"]["rows"], 2);
    assert_eq!(stats["num_users"], 3);
    assert_eq!(stats["num_items"], 3);
    let human = ok(&["data", "stats", out.to_str().unwrap()]);
    assert_contains(&human, &["#Train", "count the padding id 0"]);

    // Preparing again into the same place needs --force.
    let e = failure(&[
        "data",
        "prepare",
        "collm-tsv",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_contains(&e, &["already exists", "--force"]);

    let scores = tmp.path().join("s.tsv");
    std::fs::write(&scores, "uid\tiid\tscore\n1\t2\t0.2\n2\t1\t0.7\n").unwrap();
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "scores",
        "--data",
        out.to_str().unwrap(),
        "--split",
        "valid",
        "--scores",
        scores.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["auc"], 1.0);
    assert_eq!(report["n"], 2);
    assert_eq!(report["uauc"], serde_json::Value::Null);
    assert_eq!(report["uauc_users"], 0);
    for sub in ["warm", "cold", "warm4", "cold4", "seen", "unseen"] {
        assert!(report["subsets"][sub]["n"].is_u64(), "{sub}");
    }
    assert_eq!(report["subsets"]["seen"]["n"], 2);
    assert_eq!(report["subsets"]["warm"]["n"], 0);

    // A scores file with the wrong number of rows, or in the wrong order.
    std::fs::write(&scores, "uid\tiid\tscore\n1\t2\t0.2\n").unwrap();
    let e = failure(&[
        "eval",
        "scores",
        "--data",
        out.to_str().unwrap(),
        "--split",
        "valid",
        "--scores",
        scores.to_str().unwrap(),
    ]);
    assert_contains(&e, &["s.tsv", "1 score lines", "split has 2 rows"]);
    std::fs::write(&scores, "uid\tiid\tscore\n2\t1\t0.2\n1\t2\t0.1\n").unwrap();
    let e = failure(&[
        "eval",
        "scores",
        "--data",
        out.to_str().unwrap(),
        "--split",
        "valid",
        "--scores",
        scores.to_str().unwrap(),
    ]);
    assert_contains(&e, &["s.tsv:2:", "split's order"]);
    std::fs::write(&scores, "uid\tiid\tscore\n1\t2\tNaN\n2\t1\t0.1\n").unwrap();
    let e = failure(&[
        "eval",
        "scores",
        "--data",
        out.to_str().unwrap(),
        "--split",
        "valid",
        "--scores",
        scores.to_str().unwrap(),
    ]);
    assert_contains(&e, &["s.tsv:2:", "finite number"]);
    // An unknown split.
    let e = failure(&[
        "eval",
        "scores",
        "--data",
        out.to_str().unwrap(),
        "--split",
        "test",
        "--scores",
        scores.to_str().unwrap(),
    ]);
    assert_contains(&e, &["no split named 'test'", "train, valid"]);

    // An edited split file is caught by the manifest's hash.
    let train = out.join("train.tsv");
    let text = std::fs::read_to_string(&train)
        .unwrap()
        .replace("1\t1\t1\t1", "1\t1\t0\t1");
    std::fs::write(&train, text).unwrap();
    let e = failure(&["data", "stats", out.to_str().unwrap()]);
    assert_contains(&e, &["train.tsv", "contents changed"]);
}

/// `collm eval compare` end to end: two scores files of a small split, the paired bootstrap's
/// report as text and JSON, and the inputs it refuses.
#[test]
fn eval_compare_reports_the_paired_difference_and_names_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    tsv_dir(&input, GOOD_TRAIN, GOOD_ITEMS);
    // A valid split of 4 users with both labels each.
    let mut valid = String::from("uid\tiid\tlabel\ttimestamp\thistory\n");
    let mut rows = Vec::new();
    for u in 1..=4u32 {
        for (k, label) in [1u8, 0, 1, 0].into_iter().enumerate() {
            let iid = 1 + (k as u32 + u) % 2;
            valid += &format!("{u}\t{iid}\t{label}\t{}\t\n", 10 + k);
            rows.push((u, iid, label));
        }
    }
    std::fs::write(input.join("valid.tsv"), valid).unwrap();
    let out = tmp.path().join("ds");
    ok(&[
        "data",
        "prepare",
        "collm-tsv",
        "--input",
        s(&input),
        "--out",
        s(&out),
    ]);
    // A ranks every positive first; B every negative first.
    let write = |name: &str, good: bool| {
        let mut t = String::from("uid\tiid\tscore\n");
        for (k, (u, i, l)) in rows.iter().enumerate() {
            let x = if (*l == 1) == good { 1.0 } else { 0.0 } + k as f64 * 1e-3;
            t += &format!("{u}\t{i}\t{x}\n");
        }
        let p = tmp.path().join(name);
        std::fs::write(&p, t).unwrap();
        p
    };
    let (a, b) = (write("a.tsv", true), write("b.tsv", false));
    let args = |x: &Path, y: &Path| -> Vec<String> {
        [
            "eval",
            "compare",
            "--data",
            s(&out),
            "--split",
            "valid",
            "--scores",
            s(x),
            "--baseline",
            s(y),
            "--resamples",
            "300",
        ]
        .iter()
        .map(|e| e.to_string())
        .collect()
    };
    let run = |x: &Path, y: &Path, extra: &[&str]| {
        let mut v = args(x, y);
        v.extend(extra.iter().map(|e| e.to_string()));
        let refs: Vec<&str> = v.iter().map(|e| e.as_str()).collect();
        ok(&refs)
    };
    let j: serde_json::Value = serde_json::from_str(&run(&a, &b, &["--json"])).unwrap();
    assert_eq!(j["n"], 16);
    assert_eq!(j["users"], 4);
    assert_eq!(j["resamples"], 300);
    let all_auc = &j["differences"][0];
    assert_eq!(all_auc["rows"], "all");
    assert_eq!(all_auc["metric"], "auc");
    assert_eq!(
        (all_auc["a"].as_f64(), all_auc["b"].as_f64()),
        (Some(1.0), Some(0.0))
    );
    assert_eq!(all_auc["diff"].as_f64(), Some(1.0));
    assert_eq!(all_auc["ci_low"].as_f64(), Some(1.0));
    assert_eq!(all_auc["p_not_above"].as_f64(), Some(0.0));
    let uauc = &j["differences"][1];
    assert_eq!(uauc["metric"], "uauc");
    assert_eq!(uauc["diff"].as_f64(), Some(1.0));
    // All rows, then the train counts' warm and cold subsets.
    let names: Vec<&str> = j["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["rows"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all", "all", "warm", "warm", "cold", "cold"]);
    // The same seed, the same report; the text names both files and the method.
    assert_eq!(
        run(&a, &b, &["--json"]),
        run(&a, &b, &["--json", "--seed", "0"])
    );
    let text = run(&a, &b, &[]);
    assert_contains(
        &text,
        &[
            "a.tsv",
            "b.tsv",
            "95% interval",
            "P(A<=B)",
            "+1.0000",
            "<0.0033",
            "4 users",
        ],
    );
    // The other way round, A is below B in every draw.
    let j: serde_json::Value = serde_json::from_str(&run(&b, &a, &["--json"])).unwrap();
    assert_eq!(j["differences"][0]["p_not_above"].as_f64(), Some(1.0));

    // A baseline in the wrong order names its file and line; too few resamples are refused.
    let bad = tmp.path().join("bad.tsv");
    let text = std::fs::read_to_string(&b).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(1, 2);
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let v = args(&a, &bad);
    let refs: Vec<&str> = v.iter().map(|e| e.as_str()).collect();
    assert_contains(&failure(&refs), &["bad.tsv:2:", "split's order"]);
    let mut v = args(&a, &b);
    *v.last_mut().unwrap() = "1".into();
    let refs: Vec<&str> = v.iter().map(|e| e.as_str()).collect();
    assert_contains(&failure(&refs), &["--resamples is 1"]);
}

/// Prepares a collm-tsv input that must fail; checks the message and that nothing is left.
fn tsv_fails(train: &str, items: &[u8], expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    tsv_dir(&input, train, items);
    let e = failure(&[
        "data",
        "prepare",
        "collm-tsv",
        "--input",
        input.to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert_contains(&e, expect);
    assert_only(tmp.path(), &["in"]);
}

#[test]
fn bad_collm_tsv_inputs_name_file_line_and_expectation() {
    let h = "uid\tiid\tlabel\ttimestamp\thistory\n";
    // Malformed line: a missing field.
    tsv_fails(
        &format!("{h}1\t1\t1\t1\t\n1\t2\t0\n"),
        GOOD_ITEMS,
        &["train.tsv:3:", "expected 5 tab-separated fields", "found 3"],
    );
    // Wrong separator: commas.
    tsv_fails(
        "uid,iid,label,timestamp,history\n1,1,1,1,\n",
        GOOD_ITEMS,
        &["train.tsv:1:", "bad header", "tab-separated"],
    );
    // A label that is not 0/1.
    tsv_fails(
        &format!("{h}1\t1\t4\t1\t\n"),
        GOOD_ITEMS,
        &["train.tsv:2:", "'label'", "expected 0 or 1"],
    );
    // A non-numeric id in a history.
    tsv_fails(
        &format!("{h}1\t1\t1\t1\t2,x\n"),
        GOOD_ITEMS,
        &["train.tsv:2:", "'history'", "positive integer"],
    );
    // An item without a title.
    tsv_fails(
        &format!("{h}1\t1\t1\t1\t\n1\t7\t0\t2\t1\n"),
        GOOD_ITEMS,
        &["train.tsv:3:", "item 7 has no title"],
    );
    // Invalid UTF-8 where UTF-8 is required.
    tsv_fails(
        GOOD_TRAIN,
        b"iid\ttitle\n1\tOne\n2\tT\xe9l\xe9\n",
        &["items.tsv:3:", "invalid UTF-8", "expected UTF-8"],
    );
    // An empty title.
    tsv_fails(
        GOOD_TRAIN,
        b"iid\ttitle\n1\tOne\n2\t  \n",
        &["items.tsv:3:", "empty title"],
    );
    // An empty file.
    tsv_fails(
        "",
        GOOD_ITEMS,
        &["train.tsv", "empty file", "expected the header line"],
    );
    // A header only.
    tsv_fails(h, GOOD_ITEMS, &["train.tsv", "no rows"]);
}

fn ml_fails(ratings: &str, movies: &[u8], expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::write(raw.join("ratings.dat"), ratings).unwrap();
    std::fs::write(raw.join("movies.dat"), movies).unwrap();
    let e = failure(&[
        "data",
        "prepare",
        "ml-1m",
        "--raw",
        raw.to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert_contains(&e, expect);
    assert_only(tmp.path(), &["raw"]);
}

#[test]
fn bad_ml1m_inputs_name_file_line_and_expectation() {
    let movies = b"1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n";
    let good = "1::1::5::1000000000\n";
    ml_fails(
        &format!("{good}1::2::5\n"),
        movies,
        &[
            "ratings.dat:2:",
            "expected 4 fields separated by '::'",
            "found 3",
        ],
    );
    ml_fails(
        &format!("{good}1\t2\t5\t1000000000\n"),
        movies,
        &["ratings.dat:2:", "separated by '::'", "found 1"],
    );
    ml_fails(
        &format!("{good}1::2::6::1000000000\n"),
        movies,
        &["ratings.dat:2:", "Rating is 6", "expected 1..5"],
    );
    ml_fails(
        &format!("{good}1::3::4::1000000000\n"),
        movies,
        &["ratings.dat:2:", "movie 3", "no title"],
    );
    ml_fails(
        good,
        b"1::Toy Story (1995)::Animation\n2::::Action\n",
        &["movies.dat:2:", "empty title"],
    );
    ml_fails("", movies, &["ratings.dat", "empty file"]);
    // Cut off mid-line: the last timestamp is shorter but still a number.
    ml_fails(
        "1::1::5::1000000000\n1::2::4::10411",
        movies,
        &["ratings.dat:2:", "no line ending", "truncated"],
    );
    ml_fails(
        &format!("{good}1::x::4::1000000000\n"),
        movies,
        &["ratings.dat:2:", "MovieID is 'x'", "expected an integer"],
    );
}

#[test]
fn bad_amazon_inputs_name_file_line_and_expectation() {
    use flate2::write::GzEncoder;
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let meta = tmp.path().join("meta.json");
    std::fs::write(&meta, "{\"asin\": \"X\", \"title\": \"Book\"}\n").unwrap();
    let run = |reviews: &Path| -> String {
        failure(&[
            "data",
            "prepare",
            "amazon-book",
            "--reviews",
            reviews.to_str().unwrap(),
            "--meta",
            meta.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ])
    };
    let good = r#"{"reviewerID": "A", "asin": "X", "overall": 5.0, "unixReviewTime": 1484006400}"#;
    // A truncated .gz.
    let mut big = String::new();
    for _ in 0..2000 {
        big.push_str(good);
        big.push('\n');
    }
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(big.as_bytes()).unwrap();
    let bytes = enc.finish().unwrap();
    let trunc = tmp.path().join("trunc.json.gz");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    assert_contains(
        &run(&trunc),
        &["trunc.json.gz", "truncated or corrupt gzip"],
    );
    // A malformed line, a missing field, a rating outside 1..5.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, format!("{good}\n{{\"reviewerID\": \"A\",\n")).unwrap();
    assert_contains(&run(&bad), &["bad.json:2:", "expected a JSON object"]);
    std::fs::write(
        &bad,
        format!("{good}\n{{\"reviewerID\": \"A\", \"asin\": \"X\", \"unixReviewTime\": 1}}\n"),
    )
    .unwrap();
    assert_contains(&run(&bad), &["bad.json:2:", "missing field `overall`"]);
    std::fs::write(&bad, good.replace("5.0", "7.0")).unwrap();
    assert_contains(
        &run(&bad),
        &["bad.json:1:", "overall is 7", "expected 1..5"],
    );
    std::fs::write(&bad, "").unwrap();
    assert_contains(&run(&bad), &["bad.json", "empty file"]);
    assert_only(tmp.path(), &["meta.json", "trunc.json.gz", "bad.json"]);
}

#[test]
fn synthetic_prepare_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for out in [&a, &b] {
        ok(&[
            "data",
            "prepare",
            "synthetic",
            "--users",
            "40",
            "--items",
            "30",
            "--seed",
            "5",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    for f in ["train.tsv", "valid.tsv", "test.tsv", "items.tsv"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
}
