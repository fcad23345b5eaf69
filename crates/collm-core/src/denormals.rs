//! Subnormal floats flushed to zero. An f32 below 1.18e-38 in magnitude is subnormal, and x86
//! CPUs compute with subnormal operands or results tens of times slower than with normal ones.
//! Training makes them: weight decay shrinks weights that no loss pulls on toward zero without
//! end (SASRec's attention and feed-forward weights in the ML-1M table's runs become almost all
//! subnormal after ~100 epochs, and its epochs ran ~3x slower than its first ones on an idle
//! box). Flushing (the x86 MXCSR's FTZ, results flushed to zero, and DAZ, subnormal inputs read
//! as zero) changes only numbers below 1.18e-38, which no score or gradient here can tell from
//! zero. The `collm` binary flushes from its start (`COLLM_DENORMALS=keep` keeps them, e.g. to
//! reproduce a run made before bit for bit); the libraries, their tests and the Python module
//! (whose process is the user's, numpy's too; `collm.flush_denormals()` opts in) leave the CPU's
//! default (kept) unless they call [`set`].
//!
//! The mode is per thread: [`set`] sets it on the calling thread and on every thread of rayon's
//! global pool (where the kernels, candle's CPU ops and the gemm crate run); threads started
//! later inherit it from the thread that starts them. x86-64 only: elsewhere [`supported`] is
//! false and nothing changes.

use anyhow::{bail, Result};

/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut c: u32 = 0;
    // SAFETY: stmxcsr stores the 32-bit MXCSR register into the u32 we own.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut c, options(nostack, preserves_flags)) };
    c
}

#[cfg(target_arch = "x86_64")]
fn set_mxcsr(c: u32) {
    // SAFETY: ldmxcsr loads a value read from MXCSR with only the FTZ/DAZ bits changed (both
    // defined on every x86-64 CPU with SSE2, which x86-64 requires).
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &c, options(nostack, readonly, preserves_flags))
    };
}

/// Whether this target can flush subnormals.
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

/// Flushes subnormals to zero (`true`) or keeps them (`false`) on the calling thread only.
pub fn set_this_thread(flush: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let c = mxcsr();
        set_mxcsr(if flush { c | FTZ_DAZ } else { c & !FTZ_DAZ });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = flush;
}

/// Whether the calling thread flushes subnormals.
pub fn flushing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        mxcsr() & FTZ_DAZ == FTZ_DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Flushes (`true`) or keeps (`false`) subnormals on the calling thread and on every thread of
/// rayon's global pool (created here if it was not yet).
pub fn set(flush: bool) {
    set_this_thread(flush);
    rayon::broadcast(|_| set_this_thread(flush));
}

/// The mode `COLLM_DENORMALS` asks for: `flush` (also when unset) or `keep`.
pub fn from_env() -> Result<bool> {
    match std::env::var("COLLM_DENORMALS") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "" | "flush" => Ok(true),
            "keep" => Ok(false),
            other => bail!("COLLM_DENORMALS={other}: expected flush (the default) or keep"),
        },
    }
}

/// What [`flushing`] means, as `collm llm kernel` and benchmarks print it.
pub fn describe() -> &'static str {
    if !supported() {
        "kept (flushing is x86-64 only)"
    } else if flushing() {
        "flushed to zero (FTZ/DAZ; COLLM_DENORMALS=keep keeps them)"
    } else {
        "kept (COLLM_DENORMALS=keep, or a library's default)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    /// A subnormal result (FTZ) and a product with a subnormal input (DAZ).
    fn probes() -> (f32, f32) {
        (
            black_box(1e-30f32) * black_box(1e-10f32),
            black_box(1e-40f32) * black_box(1e10f32),
        )
    }

    #[test]
    fn flushing_zeroes_subnormals_on_this_thread_and_every_pool_thread_and_keeping_restores_them() {
        if !supported() {
            return;
        }
        set(false);
        let (ftz, daz) = probes();
        assert!(ftz > 0.0 && ftz < f32::MIN_POSITIVE, "{ftz}");
        assert!((daz / 1e-30 - 1.0).abs() < 1e-3, "{daz}");
        assert!(!flushing());
        set(true);
        assert!(flushing());
        assert_eq!(probes(), (0.0, 0.0));
        let pool: Vec<(f32, f32)> = rayon::broadcast(|_| probes());
        assert_eq!(pool.len(), rayon::current_num_threads());
        assert!(pool.iter().all(|&p| p == (0.0, 0.0)), "{pool:?}");
        // A thread started now inherits the mode.
        assert_eq!(std::thread::spawn(probes).join().unwrap(), (0.0, 0.0));
        // Normal numbers are untouched.
        assert_eq!(black_box(1.5f32) * black_box(2.0f32), 3.0);
        set(false);
        assert!(rayon::broadcast(|_| probes().0 > 0.0)
            .into_iter()
            .all(|x| x));
    }

    #[test]
    fn the_environment_variable_is_read_strictly() {
        // (Only this test touches COLLM_DENORMALS.)
        std::env::set_var("COLLM_DENORMALS", "keep");
        assert!(!from_env().unwrap());
        std::env::set_var("COLLM_DENORMALS", "flush");
        assert!(from_env().unwrap());
        std::env::set_var("COLLM_DENORMALS", "off");
        let e = from_env().unwrap_err().to_string();
        assert!(
            e.contains("COLLM_DENORMALS=off") && e.contains("keep"),
            "{e}"
        );
        std::env::remove_var("COLLM_DENORMALS");
        assert!(from_env().unwrap());
    }
}
