//! What the command-line tests share: running the `collm` binary and checking its outcome.
#![allow(dead_code)] // each test file uses a part

use std::path::Path;
use std::process::{Command, Output};

/// Runs `collm ARGS` with extra environment variables, logging errors only.
pub fn collm_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_collm"));
    c.args(args).env("COLLM_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("collm runs")
}

pub fn collm(args: &[&str]) -> Output {
    collm_env(args, &[])
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = collm(args);
    assert!(
        o.status.success(),
        "collm {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail with status 1; returns its stderr.
pub fn failure(args: &[&str]) -> String {
    let o = collm(args);
    assert_eq!(o.status.code(), Some(1), "collm {args:?}: {o:?}");
    String::from_utf8(o.stderr).unwrap()
}

/// Runs a command that must fail, with each of `expect` in its error.
pub fn fails(args: &[&str], expect: &[&str]) -> String {
    let e = failure(args);
    assert_contains(&e, expect);
    e
}

pub fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in:\n{text}");
    }
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A run's `metrics.json` without its wall-clock fields.
pub fn metrics(run: &Path) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for k in ["seconds", "samples_per_second", "train_seconds"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    strip(&mut v);
    v
}

/// A copy of directory `from` at `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}
