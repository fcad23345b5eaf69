//! Nothing lost, round 3: each case a careful user or a reviewer hit, as a real `collm`
//! process on tiny runs it makes (MF, TALLRec and CoLLM-MF over a tiny random backbone). The
//! killed and failed `--force` cases are in `crash_resume.rs`.

mod common;

use common::{collm_env, copy_dir, fails, ok, s};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Runs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    mf: PathBuf,
    step1: PathBuf,
    collm: PathBuf,
}

/// Dataset, MF run, step 1 and a CoLLM-MF run, through the binary, made once.
fn runs() -> &'static Runs {
    static R: OnceLock<Runs> = OnceLock::new();
    R.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
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
        for (mode, out) in [("tallrec", "step1"), ("collm", "collm")] {
            let cfg = root.join(format!("{out}.toml"));
            std::fs::write(&cfg, config(&root, mode, "")).unwrap();
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
        Runs {
            _tmp: tmp,
            data,
            mf,
            step1: root.join("step1"),
            collm: root.join("collm"),
            root,
        }
    })
}

/// A run config over the fixture's data, backbone, MF run and step 1, with `extra` in [model].
fn config(root: &Path, mode: &str, extra: &str) -> String {
    format!(
        "mode = \"{mode}\"\n[data]\npath = {:?}\n[model]\nbackbone = {:?}\ncf_run = {:?}\nstep1 = {:?}\nmapper_mult = 2\neval_batch_size = 4\n{extra}\n\
[training]\nmax_steps = 2\neval_every = 2\neval_rows = 8\nbatch_size = 4\nwarmup_steps = 1\n",
        s(&root.join("data")),
        s(&root.join("backbone")),
        s(&root.join("mf")),
        s(&root.join("step1"))
    )
}

fn eval_collm(run: &Path) -> std::process::Output {
    common::collm(&[
        "eval",
        "collm",
        "--run",
        s(run),
        "--split",
        "valid",
        "--json",
    ])
}

#[test]
fn a_step1_adapter_changed_after_step2_is_refused() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    // A step-2 run over a copy of step 1, whose adapter is then replaced.
    let step1 = dir.path().join("step1");
    copy_dir(&r.step1, &step1);
    let cfg = dir.path().join("collm.toml");
    let text = config(&r.root, "collm", "").replace(s(&r.step1), s(&step1));
    std::fs::write(&cfg, text).unwrap();
    let run = dir.path().join("collm");
    ok(&[
        "train",
        "collm",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--quiet",
    ]);
    assert!(eval_collm(&run).status.success());
    let adapter = step1.join("best/lora/adapter_model.safetensors");
    let mut bytes = std::fs::read(&adapter).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40; // one weight changed
    std::fs::write(&adapter, bytes).unwrap();
    let o = eval_collm(&run);
    assert!(!o.status.success());
    common::assert_contains(
        &String::from_utf8_lossy(&o.stderr),
        &["step-1 adapter", "not the one it was trained with"],
    );
}

#[test]
fn a_retrained_cf_run_under_the_same_path_is_refused() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    let mf = dir.path().join("mf");
    copy_dir(&r.mf, &mf);
    let cfg = dir.path().join("collm.toml");
    std::fs::write(&cfg, config(&r.root, "collm", "").replace(s(&r.mf), s(&mf))).unwrap();
    let run = dir.path().join("collm");
    ok(&[
        "train",
        "collm",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--quiet",
    ]);
    ok(&[
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        s(&r.data),
        "--dim",
        "8",
        "--max-epochs",
        "2",
        "--seed",
        "9",
        "--quiet",
        "--force",
        "--out",
        s(&mf),
    ]);
    let o = eval_collm(&run);
    assert!(!o.status.success());
    common::assert_contains(
        &String::from_utf8_lossy(&o.stderr),
        &["CF run", "another model"],
    );
}

#[test]
fn a_runs_own_adapter_or_adapter_config_edited_is_refused() {
    let r = runs();
    for (file, edit) in [
        ("adapter_config.json", Some(r#"{"r": 16}"#)),
        ("adapter_config.json", None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("step1");
        copy_dir(&r.step1, &run);
        let p = run.join("best/lora").join(file);
        match edit {
            Some(text) => std::fs::write(&p, text).unwrap(),
            None => std::fs::remove_file(&p).unwrap(),
        }
        let o = eval_collm(&run);
        assert!(!o.status.success(), "{file} {edit:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(file), "{e}");
    }
}

#[test]
fn f16_is_refused_by_name_and_a_failed_force_keeps_the_run() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("collm");
    copy_dir(&r.collm, &run);
    let before = std::fs::read(run.join("metrics.json")).unwrap();
    let cfg = dir.path().join("f16.toml");
    std::fs::write(&cfg, config(&r.root, "collm", "dtype = \"f16\"")).unwrap();
    fails(
        &[
            "train",
            "collm",
            "--config",
            s(&cfg),
            "--out",
            s(&run),
            "--force",
            "--quiet",
        ],
        &["model.dtype", "f32", "bf16"],
    );
    assert_eq!(std::fs::read(run.join("metrics.json")).unwrap(), before);
    assert!(
        eval_collm(&run).status.success(),
        "the old run still evaluates"
    );
}

#[test]
fn data_prepare_force_replaces_datasets_only() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), "keep me").unwrap();
    let args = |out: &Path| {
        vec![
            "data".to_string(),
            "prepare".into(),
            "synthetic".into(),
            "--users".into(),
            "8".into(),
            "--items".into(),
            "8".into(),
            "--out".into(),
            s(out).into(),
            "--force".into(),
        ]
    };
    let a = args(&notes);
    fails(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &["holds no dataset.json"],
    );
    assert_eq!(
        std::fs::read_to_string(notes.join("notes.txt")).unwrap(),
        "keep me"
    );
    // A dataset is replaced.
    let data = dir.path().join("data");
    let a = args(&data);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(&a);
    ok(&a);
}

/// No `.NAME.tmp-PID` beside `dir`'s entries.
fn no_temporaries(dir: &Path) {
    let tmp: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "left behind: {tmp:?}");
}

#[test]
fn outputs_that_are_directories_fail_without_temporaries() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.tsv");
    std::fs::write(&pairs, "1\t2\n1\t3\n").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    fails(
        &[
            "score",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--input",
            s(&pairs),
            "--out",
            s(&out),
            "--quiet",
        ],
        &["is a directory"],
    );
    fails(
        &[
            "eval",
            "cf",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--split",
            "valid",
            "--scores-out",
            s(&out),
        ],
        &["is a directory"],
    );
    fails(
        &[
            "rank",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--split",
            "valid",
            "--candidates",
            "20",
            "--out",
            s(&out),
            "--quiet",
        ],
        &["is a directory"],
    );
    no_temporaries(dir.path());
}

#[test]
fn score_never_replaces_its_input_and_its_output_evaluates() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    // The valid split's pairs, in order.
    let valid = std::fs::read_to_string(r.data.join("valid.tsv")).unwrap();
    let pairs: String = valid
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            format!("{}\t{}\n", f[0], f[1])
        })
        .collect();
    let input = dir.path().join("pairs.tsv");
    std::fs::write(&input, &pairs).unwrap();
    fails(
        &[
            "score",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--input",
            s(&input),
            "--out",
            s(&input),
            "--quiet",
        ],
        &["is the --input file"],
    );
    assert_eq!(std::fs::read_to_string(&input).unwrap(), pairs);
    let out = dir.path().join("scores.tsv");
    ok(&[
        "score",
        "--run",
        s(&r.mf),
        "--data",
        s(&r.data),
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--quiet",
    ]);
    let from_file: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "scores",
        "--data",
        s(&r.data),
        "--split",
        "valid",
        "--scores",
        s(&out),
        "--json",
    ]))
    .unwrap();
    let direct: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "cf",
        "--run",
        s(&r.mf),
        "--data",
        s(&r.data),
        "--split",
        "valid",
        "--json",
    ]))
    .unwrap();
    assert_eq!(from_file["auc"], direct["auc"]);
}

/// A command refused at its arguments (clap's usage error, status 2), saying `expect`.
fn usage_error(args: &[&str], expect: &[&str]) {
    let o = common::collm(args);
    assert_eq!(o.status.code(), Some(2), "collm {args:?}: {o:?}");
    common::assert_contains(&String::from_utf8_lossy(&o.stderr), expect);
}

#[test]
fn counts_of_zero_are_refused() {
    let r = runs();
    usage_error(
        &[
            "rank",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--user",
            "1",
            "--k",
            "0",
        ],
        &["--k", "at least 1"],
    );
    for flag in ["--max-batch", "--queue", "--max-body"] {
        usage_error(
            &["serve", "--run", s(&r.mf), "--data", s(&r.data), flag, "0"],
            &[flag, "at least 1"],
        );
    }
}

/// `RAYON_NUM_THREADS=64` is capped for every pool that reads it: rayon's global pool and
/// candle's own rayon and barrier pools (which read the variable themselves when candle first
/// runs an op on 64K elements or more: here an MF of width 256 scoring ~1,000 valid rows). The
/// evaluation ends with at most three pools of one thread per CPU, not 2 + 64 threads (66 before
/// the variables themselves were capped).
#[test]
fn a_huge_thread_count_is_capped_with_a_warning_for_every_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = (tmp.path().join("data"), tmp.path().join("mf"));
    ok(&[
        "data",
        "prepare",
        "synthetic",
        "--users",
        "300",
        "--items",
        "90",
        "--rows-per-user",
        "20",
        "--out",
        s(&data),
    ]);
    ok(&[
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        s(&data),
        "--dim",
        "256",
        "--max-epochs",
        "1",
        "--quiet",
        "--out",
        s(&run),
    ]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let o = collm_env(
        &[
            "eval",
            "cf",
            "--run",
            s(&run),
            "--data",
            s(&data),
            "--split",
            "valid",
            "--json",
        ],
        &[
            ("RAYON_NUM_THREADS", "64".into()),
            ("COLLM_LOG", "debug".into()),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    common::assert_contains(&e, &["RAYON_NUM_THREADS=64", "using"]);
    let threads: usize = e
        .lines()
        .find_map(|l| l.split("threads at exit: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thread count in {e}"));
    assert!(threads <= 3 * cpus + 4, "{threads} threads for {cpus} CPUs");
}

#[test]
fn an_unknown_device_is_said_not_ignored() {
    let r = runs();
    for dev in ["gpu7", "cuda"] {
        let o = collm_env(
            &[
                "eval",
                "collm",
                "--run",
                s(&r.collm),
                "--split",
                "valid",
                "--json",
            ],
            &[("COLLM_DEVICE", dev.into()), ("COLLM_LOG", "warn".into())],
        );
        assert!(o.status.success(), "{o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains(&format!("COLLM_DEVICE={dev}")) && e.contains("CPU"),
            "{dev}: {e}"
        );
    }
}

#[test]
fn errors_quote_at_most_a_line_s_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("huge.toml");
    std::fs::write(&cfg, format!("mode = \"{}\"\n", "x".repeat(10 << 20))).unwrap();
    let e = fails(
        &[
            "train",
            "collm",
            "--config",
            s(&cfg),
            "--out",
            s(&dir.path().join("run")),
        ],
        &["more characters"],
    );
    assert!(e.len() < 10_000, "{} bytes of stderr", e.len());
}

#[test]
fn weight_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let r = runs();
    // The tests run under the default umask (022 here, as on CI): weights are world-readable
    // like every other file of a run.
    let cfg_mode = std::fs::metadata(r.mf.join("config.toml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    for f in [
        r.mf.join("model.safetensors"),
        r.step1.join("best/lora/adapter_model.safetensors"),
    ] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            cfg_mode,
            "{}: {mode:o} vs config.toml's {cfg_mode:o}",
            f.display()
        );
    }
}

#[test]
fn a_prompt_past_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = dir.path().join("backbone");
    collm_llm::testing::write_tiny_backbone(&backbone, 1).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backbone.join("config.json")).unwrap())
            .unwrap();
    let max = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
    let prompt = "a ".repeat(max + 10);
    fails(
        &[
            "llm",
            "score",
            "--model",
            s(&backbone),
            "--prompt",
            &prompt,
            "--tokens",
            "a",
        ],
        &["longer than the model's context"],
    );
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_it_grows() {
    let r = runs();
    let dir = tempfile::tempdir().unwrap();
    fails(
        &[
            "train",
            "cf",
            "--model",
            "mf",
            "--data",
            s(&r.data),
            "--dim",
            "100000000",
            "--quiet",
            "--out",
            s(&dir.path().join("mf")),
        ],
        &["dim = 100000000", "GB", "smaller dim"],
    );
    assert!(!dir.path().join("mf").exists());
}

/// Every float field of every config and flag is refused, naming the field, when it is not a
/// finite number in its range: NaN, ±infinity, a negative value, and one past the range's far
/// end, for each (a table over all of them).
#[test]
fn every_numeric_field_is_refused_out_of_range_naming_it() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let bad = ["nan", "inf", "-inf", "-1.0"];
    // (what, field as written, the name the error gives, a value past the far end)
    let collm_fields = [
        ("[training]", "lr", "'lr'", Some("1e30")),
        ("[training]", "min_lr", "'min_lr'", Some("100.0")),
        ("[training]", "weight_decay", "'weight_decay'", Some("1e30")),
        ("[training]", "clip_norm", "'clip_norm'", None),
        (
            "[training]",
            "checkpoint_minutes",
            "'checkpoint_minutes'",
            None,
        ),
        ("[model.lora]", "alpha", "'lora.alpha'", Some("1e30")),
        ("[model.lora]", "dropout", "'lora.dropout'", Some("1.0")),
    ];
    let mut checked = 0;
    for (section, field, name, far) in collm_fields {
        for v in bad.iter().copied().chain(far) {
            let cfg = tmp.path().join(format!("c-{checked}.toml"));
            let mut text = config(&r.root, "collm", "");
            // The field's own section, appended (TOML allows a table once: [training] exists,
            // so its field goes right after that header).
            if section == "[training]" {
                text = text.replace("[training]\n", &format!("[training]\n{field} = {v}\n"));
            } else {
                text.push_str(&format!("\n{section}\n{field} = {v}\n"));
            }
            std::fs::write(&cfg, text).unwrap();
            let e = common::failure(&[
                "train",
                "collm",
                "--config",
                s(&cfg),
                "--out",
                s(&tmp.path().join(format!("run-{checked}"))),
            ]);
            assert!(
                e.contains(name) && e.contains("finite number"),
                "{field} = {v}: {e}"
            );
            assert!(!tmp.path().join(format!("run-{checked}")).exists());
            checked += 1;
        }
    }
    let cf_fields = [
        ("lr", Some("1e30")),
        ("weight_decay", Some("1e30")),
        ("init_std", Some("1e30")),
        ("dropout", Some("1.0")),
    ];
    for (field, far) in cf_fields {
        for v in bad.iter().copied().chain(far) {
            let cfg = tmp.path().join(format!("cf-{checked}.toml"));
            std::fs::write(&cfg, format!("model = \"mf\"\ndim = 8\n{field} = {v}\n")).unwrap();
            let e = common::failure(&[
                "train",
                "cf",
                "--config",
                s(&cfg),
                "--data",
                s(&r.data),
                "--out",
                s(&tmp.path().join(format!("run-{checked}"))),
            ]);
            assert!(
                e.contains(&format!("'{field}'")) && e.contains("finite number"),
                "{field} = {v}: {e}"
            );
            checked += 1;
        }
    }
    // Flags.
    for (flag, name) in [("--lr", "'lr'"), ("--weight-decay", "'weight_decay'")] {
        for v in bad {
            let arg = format!("{flag}={v}"); // (a value may start with '-')
            let e = common::failure(&[
                "train",
                "cf",
                "--model",
                "mf",
                "--data",
                s(&r.data),
                &arg,
                "--out",
                s(&tmp.path().join(format!("run-{checked}"))),
            ]);
            assert!(
                e.contains(name) && e.contains("finite number"),
                "{flag} {v}: {e}"
            );
            checked += 1;
        }
    }
    for (flag, name) in [
        ("--rows-per-user", "'rows_per_user'"),
        ("--semantic-weight", "'semantic_weight'"),
        ("--taste-weight", "'taste_weight'"),
        ("--collaborative-weight", "'collaborative_weight'"),
    ] {
        for v in bad.iter().copied().chain(["1e30"]) {
            let out = tmp.path().join(format!("data-{checked}"));
            let e = common::failure(&[
                "data",
                "prepare",
                "synthetic",
                "--users",
                "5",
                "--items",
                "5",
                &format!("{flag}={v}"), // (a value may start with '-')
                "--out",
                s(&out),
            ]);
            assert!(
                e.contains(name) && e.contains("finite number"),
                "{flag} {v}: {e}"
            );
            assert!(!out.exists());
            checked += 1;
        }
    }
    assert!(checked >= 70, "{checked} cases");
}

/// Resuming with another setting names each field that differs and both values.
#[test]
fn a_resume_with_other_settings_names_each_differing_field() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("mf");
    let base = [
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        s(&r.data),
        "--dim",
        "8",
        "--quiet",
    ];
    ok(&[&base[..], &["--max-epochs", "2", "--out", s(&run)]].concat());
    fails(
        &[
            &base[..],
            &[
                "--max-epochs",
                "3",
                "--lr",
                "0.05",
                "--out",
                s(&run),
                "--resume",
            ],
        ]
        .concat(),
        &[
            "max_epochs: the run has 2, now 3",
            "lr: the run has",
            "now 0.05",
        ],
    );
}

/// Ranking with k not below the number of candidates is refused (HR@k would be 1 by
/// construction).
#[test]
fn ranking_with_k_not_below_the_candidates_is_refused() {
    let r = runs();
    fails(
        &[
            "rank",
            "--run",
            s(&r.mf),
            "--data",
            s(&r.data),
            "--split",
            "valid",
            "--candidates",
            "5",
            "--k",
            "10",
        ],
        &["--k 10 is not below --candidates 5", "HR@10 = 1"],
    );
    ok(&[
        "rank",
        "--run",
        s(&r.mf),
        "--data",
        s(&r.data),
        "--split",
        "valid",
        "--candidates",
        "5",
        "--k",
        "4",
    ]);
}
