//! Hand-checked fixtures for every raw source: ids, splits, histories, titles and counts.

use collm_data::dataset::{write_dataset, PreparedData};
use collm_data::sources::{amazon, collm_tsv, ml1m};
use collm_data::{Dataset, Interaction};
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::Path;

fn row(uid: u32, iid: u32, label: u8, timestamp: i64, history: &[u32]) -> Interaction {
    Interaction {
        uid,
        iid,
        label,
        timestamp,
        history: history.to_vec(),
    }
}

fn rows_of<'a>(d: &'a PreparedData, name: &str) -> &'a [Interaction] {
    &d.splits.iter().find(|s| s.name == name).unwrap().rows
}

// UTC timestamps used below.
const MAY_2001: i64 = 989_884_800; // 2001-05-15: before the window
const JUN_2001: i64 = 991_353_600; // 2001-06-01 00:00:00: first train second
const JUL_2001: i64 = 993_945_600;
const LAST_TRAIN_SECOND: i64 = 1_017_619_199; // 2002-03-31 23:59:59
const FIRST_VALID_SECOND: i64 = 1_017_619_200; // 2002-04-01 00:00:00
const MAY_2002: i64 = 1_020_211_200;
const OCT_2002: i64 = 1_033_430_400;
const FEB_2003: i64 = 1_044_057_600; // after the window

pub fn write_ml1m_fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ratings = [
        format!("10::100::5::{MAY_2001}"), // dropped: before the window
        format!("10::200::4::{JUL_2001}"), // train, positive
        format!("10::300::2::{JUL_2001}"), // same second, after 200 in file order
        format!("10::100::3::{MAY_2002}"), // valid
        format!("10::400::5::{OCT_2002}"), // test
        format!("5::300::4::{LAST_TRAIN_SECOND}"), // train (last second)
        format!("5::500::5::{FEB_2003}"),  // dropped: after the window
        format!("5::400::1::{JUN_2001}"),  // train (first second), earlier than the line above
        format!("7::200::1::{FIRST_VALID_SECOND}"), // a user with only negatives
        format!("7::300::3::{OCT_2002}"),
        format!("8::600::5::{OCT_2002}"), // item 600 only in test
    ];
    std::fs::write(dir.join("ratings.dat"), ratings.join("\n") + "\n").unwrap();
    // movies.dat is Latin-1: 0xE9 is 'é'.
    let mut movies = Vec::new();
    for (id, title) in [
        (100, "Heat (1995)"),
        (200, "Toy Story (1995)"),
        (300, "Am\u{e9}lie (2001)"),
        (400, "Alien (1979)"),
        (500, "Fargo (1996)"),
        (600, "Memento (2000)"),
        (700, "Never Rated (1990)"),
    ] {
        let line: Vec<u8> = format!("{id}::{title}::Drama\n")
            .chars()
            .map(|c| c as u32 as u8)
            .collect();
        movies.extend(line);
    }
    std::fs::write(dir.join("movies.dat"), movies).unwrap();
    std::fs::write(dir.join("users.dat"), "5::F::1::10::48067\n").unwrap();
}

#[test]
fn ml1m_split_ids_histories_and_titles() {
    let tmp = tempfile::tempdir().unwrap();
    write_ml1m_fixture(tmp.path());
    let d = ml1m::prepare(tmp.path()).unwrap();
    // Raw users 5, 7, 8, 10 -> 1, 2, 3, 4. Items by first appearance in (user, time) order:
    // 400 -> 1, 300 -> 2, 200 -> 3, 600 -> 4, 100 -> 5.
    assert_eq!(
        rows_of(&d, "train"),
        &[
            row(1, 1, 0, JUN_2001, &[]),
            row(1, 2, 1, LAST_TRAIN_SECOND, &[]),
            row(4, 3, 1, JUL_2001, &[]),
            // Equal timestamp with item 3, after it in ratings.dat: sees it in its history.
            row(4, 2, 0, JUL_2001, &[3]),
        ]
    );
    assert_eq!(
        rows_of(&d, "valid"),
        &[
            row(2, 3, 0, FIRST_VALID_SECOND, &[]),
            row(4, 5, 0, MAY_2002, &[3])
        ]
    );
    assert_eq!(
        rows_of(&d, "test"),
        &[
            row(2, 2, 0, OCT_2002, &[]),
            row(3, 4, 1, OCT_2002, &[]),
            row(4, 1, 1, OCT_2002, &[3]),
        ]
    );
    assert_eq!(
        d.titles,
        vec![
            "",
            "Alien (1979)",
            "Am\u{e9}lie (2001)",
            "Toy Story (1995)",
            "Memento (2000)",
            "Heat (1995)"
        ]
    );
    // Written and read back, with Table 1 counts including the padding id.
    let out = tmp.path().join("out");
    let ds = write_dataset(d, &out, false).unwrap();
    assert_eq!(ds.manifest.num_users, 5);
    assert_eq!(ds.manifest.num_items, 6);
    assert_eq!(ds.manifest.source.files.len(), 3);
    let back = Dataset::load(&out).unwrap();
    assert_eq!(back.split("test").unwrap().rows, ds.splits[2].rows);
    assert_eq!(back.titles, ds.titles);
    assert_eq!(back.manifest, ds.manifest);
}

fn gz(path: &Path, text: &str) {
    let mut e = GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
}

fn review(user: &str, asin: &str, overall: f64, time: i64) -> String {
    format!(
        r#"{{"overall": {overall:.1}, "verified": true, "reviewerID": "{user}", "asin": "{asin}", "reviewText": "x \"quoted\"", "unixReviewTime": {time}}}"#
    )
}

const D2016: i64 = 1_462_406_400;
const JAN10: i64 = 1_484_006_400;
const FEB10: i64 = 1_486_684_800;
const MAR01: i64 = 1_488_326_400;
const APR01: i64 = 1_491_004_800;
const MAY01: i64 = 1_493_596_800;
const JUN01: i64 = 1_496_275_200;
const JUL01: i64 = 1_498_867_200;
const AUG08: i64 = 1_502_150_400;
const SEP09: i64 = 1_504_915_200;
const DEC01: i64 = 1_512_086_400;
const DEC05: i64 = 1_512_432_000;
const DEC20: i64 = 1_513_728_000;

#[test]
fn amazon_year_filter_titles_activity_and_december_halves() {
    let tmp = tempfile::tempdir().unwrap();
    let reviews = [
        review("A", "X", 5.0, JAN10),
        review("A", "Y", 4.0, FEB10),
        review("A", "Z", 5.0, DEC05),
        review("B", "X", 3.0, MAR01),
        review("B", "Y", 5.0, DEC01),
        review("B", "Z", 5.0, DEC05), // same day as A-Z, later in the file
        review("C", "X", 5.0, DEC20),
        review("C", "Y", 2.0, APR01),
        review("C", "Z", 1.0, MAY01),
        review("D", "X", 5.0, JUN01), // D has exactly 2 rows: not more than 2, dropped
        review("D", "Y", 5.0, JUL01),
        review("A", "W", 5.0, D2016), // another year
        review("A", "V", 5.0, AUG08), // V has no metadata: dropped before counting
        review("C", "W", 5.0, SEP09), // W has 1 row in 2017: dropped
    ];
    let rpath = tmp.path().join("reviews.json.gz");
    gz(&rpath, &(reviews.join("\n") + "\n"));
    let meta = [
        r#"{"asin": "X", "title": "Old X"}"#,
        r#"{"asin": "Y", "title": "Book\tY", "price": "$1"}"#,
        r#"{"asin": "Z", "title": "Book Z"}"#,
        r#"{"asin": "W", "title": "Book W"}"#,
        r#"{"asin": "X", "title": "Book X"}"#, // the last record wins
        r#"{"asin": "Q"}"#,
    ];
    let mpath = tmp.path().join("meta.json");
    std::fs::write(&mpath, meta.join("\n")).unwrap();
    let opts = amazon::AmazonOptions {
        year: 2017,
        activity_threshold: 2,
    };
    let d = amazon::prepare(&rpath, &mpath, &opts).unwrap();
    // Users A, B, C -> 1, 2, 3; items X, Y, Z -> 1, 2, 3 (file order).
    assert_eq!(d.titles, vec!["", "Book X", "Book Y", "Book Z"]);
    assert_eq!(
        rows_of(&d, "train"),
        &[
            row(1, 1, 1, JAN10, &[]),
            row(1, 2, 0, FEB10, &[1]),
            row(2, 1, 0, MAR01, &[]),
            row(3, 2, 0, APR01, &[]),
            row(3, 3, 0, MAY01, &[]),
        ]
    );
    // December by time: B-Y, A-Z, B-Z (tie: file order), C-X; the first half is valid.
    assert_eq!(
        rows_of(&d, "valid"),
        &[row(1, 3, 1, DEC05, &[1]), row(2, 2, 1, DEC01, &[])]
    );
    assert_eq!(
        rows_of(&d, "test"),
        &[row(2, 3, 1, DEC05, &[2]), row(3, 1, 1, DEC20, &[])]
    );
    let p = &d.source.params;
    assert_eq!(p["review_lines"], 14);
    assert_eq!(p["rows_in_year"], 13);
    assert_eq!(p["rows_with_title"], 12);
    assert_eq!(p["rows_kept"], 9);
}

#[test]
fn amazon_user_with_exactly_20_rows_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    // 21 users review all 21 items: every user and item has 21 rows.
    for u in 0..21 {
        for i in 0..21 {
            lines.push(review(
                &format!("F{u}"),
                &format!("J{i}"),
                5.0,
                JAN10 + u * 100 + i,
            ));
        }
    }
    // Q reviews 20 of them: exactly 20 rows, not more than 20.
    for i in 0..20 {
        lines.push(review("Q", &format!("J{i}"), 4.0, FEB10 + i));
    }
    let rpath = tmp.path().join("r.json");
    std::fs::write(&rpath, lines.join("\n")).unwrap();
    let meta: Vec<String> = (0..21)
        .map(|i| format!(r#"{{"asin": "J{i}", "title": "Title {i}"}}"#))
        .collect();
    let mpath = tmp.path().join("m.json");
    std::fs::write(&mpath, meta.join("\n")).unwrap();
    let d = amazon::prepare(&rpath, &mpath, &amazon::AmazonOptions::default()).unwrap();
    let all: Vec<&Interaction> = d.splits.iter().flat_map(|s| &s.rows).collect();
    assert_eq!(all.len(), 21 * 21);
    assert_eq!(all.iter().map(|r| r.uid).max(), Some(21));
    assert_eq!(d.titles.len(), 22);
}

#[test]
fn collm_tsv_round_trip_keeps_rows_and_histories() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("train.tsv"),
        "uid\tiid\tlabel\ttimestamp\thistory\n1\t1\t1\t10\t\n1\t2\t0\t11\t1\n2\t3\t1\t12\t\n",
    )
    .unwrap();
    std::fs::write(
        input.join("valid.tsv"),
        "uid\tiid\tlabel\ttimestamp\thistory\n1\t3\t1\t20\t1\n",
    )
    .unwrap();
    std::fs::write(
        input.join("items.tsv"),
        "iid\ttitle\n1\tOne\n2\tTwo, The (1999)\n3\tTr\u{e8}s\n",
    )
    .unwrap();
    let d = collm_tsv::prepare(&input, None, "movie").unwrap();
    assert_eq!(d.name, "in");
    assert_eq!(d.splits.len(), 2);
    assert_eq!(rows_of(&d, "train")[1], row(1, 2, 0, 11, &[1]));
    let out = tmp.path().join("out");
    let ds = write_dataset(d, &out, false).unwrap();
    assert_eq!(ds.manifest.splits["train"].rows, 3);
    assert_eq!(ds.manifest.splits["valid"].positives, 1);
    assert_eq!(ds.manifest.num_users, 3);
    assert_eq!(ds.manifest.num_items, 4);
    // The prepared directory is itself a valid collm-tsv input, with identical files.
    let again = collm_tsv::prepare(&out, Some("again"), "movie").unwrap();
    let ds2 = write_dataset(again, &tmp.path().join("out2"), false).unwrap();
    assert_eq!(ds2.manifest.content_sha256, ds.manifest.content_sha256);
}

/// Ids size tables (titles, embeddings): a huge or sparse id in a small file is refused, not
/// allocated. The first case is the fuzzer's finding (`fuzz/`, target `dataset_tsv`): 79 bytes
/// that once asked for ~19 GB.
#[test]
fn huge_or_sparse_ids_are_refused_not_allocated() {
    use collm_data::dataset::{read_items_tsv, read_split_tsv};
    let found = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/items-sparse-id");
    let e = format!("{:#}", read_items_tsv(&found).unwrap_err());
    assert!(
        e.contains("items-sparse-id:2:") && e.contains("not supported"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let items = tmp.path().join("items.tsv");
    std::fs::write(&items, "iid\ttitle\n1\ta\n3000000\tb\n").unwrap();
    let e = format!("{:#}", read_items_tsv(&items).unwrap_err());
    assert!(e.contains("item id 3000000 with only 2 items"), "{e}");
    std::fs::write(&items, "iid\ttitle\n1\ta\n3\tb\n").unwrap();
    assert_eq!(
        read_items_tsv(&items).unwrap().len(),
        4,
        "dense enough: accepted"
    );
    let split = tmp.path().join("train.tsv");
    std::fs::write(
        &split,
        "uid\tiid\tlabel\ttimestamp\thistory\n4000000000\t1\t1\t5\t\n",
    )
    .unwrap();
    let e = format!("{:#}", read_split_tsv(&split).unwrap_err());
    assert!(
        e.contains("train.tsv:2:") && e.contains("not supported"),
        "{e}"
    );
}
