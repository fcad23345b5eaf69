//! Embeds the git commit the binary is built from (`collm --version`: `collm 0.1.0 (git
//! 1e79e5c0ab)`, `+changes` when the sources differed from that commit), so that a result's log
//! can name the build that made it: the bf16 kernels' numbers depend on the build (an
//! optimisation that changes a summation order moves scores within bf16's precision).
//! Outside a git checkout: `(git unknown)`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.to_str().unwrap_or(".");
    let build = match git(&["-C", root, "rev-parse", "--short=10", "HEAD"]) {
        Some(hash) => {
            // What goes into the binary: the crates and the lock file.
            let changed = git(&[
                "-C",
                root,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "crates",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            format!("{hash}{}", if changed { "+changes" } else { "" })
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=COLLM_BUILD={build}");
    // Again when HEAD moves or a source changes (directories are scanned whole).
    if let Some(dir) = git(&["-C", root, "rev-parse", "--absolute-git-dir"]) {
        // (A path that does not exist would rerun it at every build.)
        for p in ["HEAD", "refs/heads", "packed-refs"] {
            if Path::new(&dir).join(p).exists() {
                println!("cargo:rerun-if-changed={dir}/{p}");
            }
        }
    }
    for p in ["crates", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={root}/{p}");
    }
}
