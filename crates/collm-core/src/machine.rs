//! This machine as benchmarks, training logs and run records describe it: its CPU, and this
//! process's peak resident memory.

/// This CPU as benchmarks and training logs report it: its model name, family/model numbers and the SIMD
/// features that decide the kernels' speed (e.g. "AMD EPYC (family 25 model 17), avx2 avx512f
/// avx512_bf16, 2 threads"). Read from /proc/cpuinfo; "unknown CPU" elsewhere.
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Some(model) = field("model name") else {
        return format!("unknown CPU, {threads} threads");
    };
    let flags = field("flags").unwrap_or_default();
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let simd: Vec<&str> = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_bf16",
    ]
    .into_iter()
    .filter(|f| flags.contains(f))
    .collect();
    let family = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!(" (family {f} model {m})"),
        _ => String::new(),
    };
    format!("{model}{family}, {}, {threads} threads", simd.join(" "))
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak-RSS counter (Linux `clear_refs` 5), so that a row's peak is its own as far
/// as memory held from earlier rows allows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
