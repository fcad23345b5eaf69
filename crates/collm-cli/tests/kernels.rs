//! The kernel a process multiplies its frozen projections with (`COLLM_KERNEL`): the same
//! training run (seed, data, backbone) with f32 and with each bf16 kernel this CPU runs ends
//! within noise of the f32 run's validation AUC and records the kernel it ran with; a kernel the
//! CPU lacks is refused naming the missing feature; `collm llm kernel` says the choice.

mod common;

use collm::testing::{Family, Spec};
use collm_data::sources::synthetic::SyntheticOptions;
use common::{collm_env, s};
use std::sync::OnceLock;

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
            step2: vec![],
            ..Spec::default()
        })
        .unwrap()
    })
}

/// (validation AUC of the best step, the run's recorded kernels) of a CoLLM-MF run trained under
/// `COLLM_KERNEL=kernel`.
fn train(kernel: &str, dir: &std::path::Path) -> (f64, Vec<String>) {
    let f = family();
    let cfg = dir.join(format!("collm-{kernel}.toml"));
    let mut c = f.config(collm::experiment::Mode::Collm);
    let t = &mut c.training;
    (t.max_steps, t.eval_every, t.eval_rows, t.batch_size) = (12, 4, 0, 8);
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let out = dir.join(format!("run-{kernel}"));
    let o = collm_env(
        &[
            "train",
            "collm",
            "--config",
            s(&cfg),
            "--quiet",
            "--out",
            s(&out),
        ],
        &[("COLLM_KERNEL", kernel.to_string())],
    );
    assert!(o.status.success(), "{kernel}: {o:?}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let auc = m["best_valid"]["auc"].as_f64().unwrap();
    let kernels = m["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    (auc, kernels)
}

#[test]
fn a_run_on_each_bf16_kernel_ends_within_noise_of_f32_and_records_its_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let (auc32, k32) = train("f32", tmp.path());
    assert_eq!(k32, ["f32"]);
    let mut kernels = vec!["emulated"];
    for (name, kernel) in [
        ("bf16", collm_llm::ops::Kernel::Avx512Bf16),
        ("amx", collm_llm::ops::Kernel::AmxBf16),
    ] {
        match kernel.available() {
            Ok(()) => kernels.push(name),
            Err(why) => eprintln!("{name} skipped: {why}"),
        }
    }
    for k in kernels {
        let (auc, rec) = train(k, tmp.path());
        eprintln!("{k}: valid AUC {auc:.4} vs f32 {auc32:.4}");
        assert_eq!(rec, [k]);
        // The whole valid split of the tiny family (a few hundred rows): a handful of pairs
        // swapping order moves AUC by ~0.01.
        assert!((auc - auc32).abs() <= 0.03, "{k}: {auc} vs f32 {auc32}");
    }
}

#[test]
fn collm_llm_kernel_names_the_choice_and_refuses_what_the_cpu_lacks() {
    let o = collm_env(&["llm", "kernel"], &[("COLLM_KERNEL", "emulated".into())]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("kernel: emulated (COLLM_KERNEL)") && out.contains("cpu: "),
        "{out}"
    );
    let o = collm_env(
        &["llm", "kernel", "--short"],
        &[("COLLM_KERNEL", "f32".into())],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "f32\n");
    let o = collm_env(&["llm", "kernel"], &[("COLLM_KERNEL", "fastest".into())]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("COLLM_KERNEL=fastest: expected auto"));
    for (name, kernel, feature) in [
        ("bf16", collm_llm::ops::Kernel::Avx512Bf16, "avx512_bf16"),
        ("amx", collm_llm::ops::Kernel::AmxBf16, "amx_bf16"),
    ] {
        let o = collm_env(&["llm", "kernel"], &[("COLLM_KERNEL", name.into())]);
        match kernel.available() {
            Ok(()) => assert!(o.status.success(), "{o:?}"),
            Err(_) => {
                let e = String::from_utf8_lossy(&o.stderr);
                assert!(!o.status.success() && e.contains(feature), "{e}");
            }
        }
    }
}

/// `collm bench llm --op-times` splits the train step by fused op: every op of a LoRA step is
/// there with its calls per step (one per layer, or per projection), the top-level ops sum to
/// no more than the step, and the frozen products inside them are reported apart.
#[test]
fn bench_llm_op_times_split_the_train_step_by_op() {
    let out = common::ok(&[
        "bench",
        "llm",
        "--plan",
        "tiny:2",
        "--seq",
        "12",
        "--steps",
        "2",
        "--warm",
        "1",
        "--op-times",
        "--json",
    ]);
    let row = json_line(&out);
    let ops = row["op_times"].as_array().expect("op_times");
    let find = |name: &str, nested: bool| {
        ops.iter()
            .find(|o| o["name"] == name && o["nested"] == nested)
            .unwrap_or_else(|| panic!("{name} (nested {nested}) missing: {ops:?}"))
    };
    // The tiny shape has 2 layers; LoRA sits on q and v (the bench's config).
    for (name, calls) in [
        ("linear+lora fwd", 4),
        ("linear+lora bwd", 4),
        ("dropout mask", 4),
        ("mlp fwd", 2),
        ("mlp bwd", 2),
        ("rms_norm fwd", 5),
    ] {
        let o = find(name, false);
        assert_eq!(o["calls"], calls, "{name}: {o}");
        assert!(o["seconds"].as_f64().unwrap() > 0.0, "{name}: {o}");
    }
    assert!(find("frozen products", true)["calls"].as_u64().unwrap() > 0);
    let step = row["batch"].as_f64().unwrap() / row["train_samples_per_s"].as_f64().unwrap();
    let inside = top_level_seconds(ops);
    assert!(
        inside > 0.0 && inside <= step,
        "{inside} s of ops in a {step} s step"
    );
}

/// `collm bench train --op-times` splits a CoLLM row's training step (the frozen-prefix path a
/// step-2 run trains with: its suffixes attend over the cached prefix, forward and backward)
/// and its shared-prefix evaluation by fused op, each op's time within the span it splits.
#[test]
fn bench_train_op_times_split_a_rows_step_and_evaluation_by_op() {
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("collm.toml");
    let mut c = f.config(collm::experiment::Mode::Collm);
    c.training.batch_size = 4;
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let out = common::ok(&[
        "bench",
        "train",
        "--config",
        s(&cfg),
        "--steps",
        "2",
        "--warm",
        "1",
        "--eval-rows",
        "12",
        "--op-times",
        "--json",
    ]);
    let r = json_line(&out);
    assert_eq!(
        r["train"].as_array().unwrap().last().unwrap()["path"],
        "frozen prefix",
        "{r}"
    );
    let check = |ops: &serde_json::Value, span: f64, want: &[&str]| {
        let ops = ops.as_array().expect("op times");
        for name in want {
            let o = ops
                .iter()
                .find(|o| o["name"] == *name && o["nested"] == false)
                .unwrap_or_else(|| panic!("{name} missing: {ops:?}"));
            assert!(o["calls"].as_u64().unwrap() > 0 && o["seconds"].as_f64().unwrap() > 0.0);
        }
        let inside = top_level_seconds(ops);
        assert!(
            inside > 0.0 && inside <= span,
            "{inside} s of ops in {span} s"
        );
    };
    let step = r["train"].as_array().unwrap().last().unwrap()["seconds_per_step"]
        .as_f64()
        .unwrap();
    check(
        &r["train_op_times"],
        step,
        &[
            "prefix attention fwd",
            "prefix attention bwd",
            "mlp fwd",
            "mlp bwd",
        ],
    );
    let per_1000 = 1000.0 / r["eval_shared_rows_per_s"].as_f64().unwrap();
    check(&r["eval_op_times"], per_1000, &["mlp fwd", "rms_norm fwd"]);
}

/// The first line of `out` that is a JSON object (a bench's `--json` output).
fn json_line(out: &str) -> serde_json::Value {
    out.lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .expect("a JSON object")
}

/// The seconds of the ops not nested in another op (their sum is at most the span they split).
fn top_level_seconds(ops: &[serde_json::Value]) -> f64 {
    ops.iter()
        .filter(|o| o["nested"] == false)
        .map(|o| o["seconds"].as_f64().unwrap())
        .sum()
}
