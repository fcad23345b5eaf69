//! Times of the decoder's ops at SmolLM2-135M's shape (batch 8, seq 160), forward only, one
//! layer: where a scoring pass spends its time besides the projections, with each kernel this
//! CPU runs. `cargo run --release -p collm-llm --example op_times`.
use candle_core::{Device, Tensor};
use collm_llm::ops::cpu as ops;
use collm_llm::ops::{Kernel, KernelChoice, Weight};
use std::time::Instant;

fn time(name: &str, n: usize, mut f: impl FnMut()) {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:<28} {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

fn main() {
    let dev = Device::Cpu;
    let (b, t, h, nh, nkv, hd, inter) = (
        8usize, 160usize, 576usize, 9usize, 3usize, 64usize, 1536usize,
    );
    let randn =
        |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).expect("random tensor");
    let x = randn(&[b, t, h], 1.0);
    let q = randn(&[b, t, nh * hd], 1.0);
    let k = randn(&[b, t, nkv * hd], 1.0);
    let v = randn(&[b, t, nkv * hd], 1.0);
    let mask = collm_llm::Mask::left_padded(&vec![t; b], t);
    let ids: Vec<f32> = (0..b * t).map(|i| (i % t) as f32).collect();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 100000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let tables = ops::RopeTables::new(&ids, &inv);
    let w = Tensor::ones(h, candle_core::DType::F32, &dev).expect("ones");
    for kernel in [Kernel::F32, Kernel::AmxBf16, Kernel::Avx512Bf16] {
        if kernel.available().is_err() {
            continue;
        }
        time(&format!("attention {}", kernel.name()), 20, || {
            ops::attention_flat(&q, &k, &v, (nh, nkv), &mask, Some(&tables), kernel)
                .expect("attention");
        });
    }
    time("rms_norm", 50, || {
        ops::rms_norm(&x, &w, 1e-5).expect("rms_norm");
    });
    time("residual add", 50, || {
        let _ = (&x + &x).expect("add");
    });
    let g = randn(&[b, t, inter], 1.0);
    time("swiglu", 50, || {
        ops::swiglu(&g, &g).expect("swiglu");
    });
    for kernel in [Kernel::F32, Kernel::Avx512Bf16, Kernel::AmxBf16] {
        if kernel.available().is_err() {
            continue;
        }
        let c = KernelChoice::all(kernel);
        let weight = |o: usize, i: usize| Weight::new(&randn(&[o, i], 0.05), c).expect("weight");
        let (wq, wk, wg, wd) = (
            weight(nh * hd, h),
            weight(nkv * hd, h),
            weight(inter, h),
            weight(h, inter),
        );
        time(&format!("q proj {}", kernel.name()), 20, || {
            ops::linear_weight(&x, &wq, None, None).expect("q");
        });
        time(&format!("k proj {}", kernel.name()), 20, || {
            ops::linear_weight(&x, &wk, None, None).expect("k");
        });
        time(&format!("mlp {}", kernel.name()), 10, || {
            ops::mlp_weights(&x, &wg, &wg, &wd).expect("mlp");
        });
    }
}
