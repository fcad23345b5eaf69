//! The packing and every kernel against a plain reference: the operands rounded to bf16, the
//! products summed in f64. The emulated kernel runs everywhere; a native kernel this CPU lacks is
//! skipped with a message naming the missing feature.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
}

/// (c, the bound on each element's error): c = a (m×k) · b (k×n) in f64 over bf16-rounded
/// operands; the bound is 2⁻²⁰ times the sum of |products| (f32 accumulation over k terms).
fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let (a, b) = (round(a), round(b));
    let mut c = vec![0f64; m * n];
    let mut bound = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let p = a[i * k + l] as f64 * b[l * n + j] as f64;
                c[i * n + j] += p;
                bound[i * n + j] += p.abs();
            }
        }
    }
    let tol = bound
        .iter()
        .map(|s| s * 2f64.powi(-20) * (k as f64).sqrt().max(1.0) + 1e-30)
        .collect();
    (c, tol)
}

/// Shapes with ragged edges on every side: below, at and above the block, panel and k steps;
/// and k over two and three of AMX's passes over k (its blocks' sums kept between them).
const SHAPES: [(usize, usize, usize); 11] = [
    (1, 1, 1),
    (3, 5, 7),
    (31, 17, 33),
    (32, 32, 32),
    (33, 47, 63),
    (64, 16, 2),
    (70, 100, 97),
    (5, 65, 200),
    (130, 40, 576),
    (45, 70, 1000),
    (33, 33, 1537),
];

fn check(kernel: Kernel) {
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        let a = random(m * k, 2 * s as u64);
        let b = random(k * n, 2 * s as u64 + 1);
        let (want, tol) = reference(&a, &b, m, n, k);
        let pb = Panels::pack(k, n, |i, j| b[i * n + j]);
        // Into a wider C (row stride n + 3), first written, then accumulated onto.
        let ldc = n + 3;
        let mut c = vec![7f32; m * ldc];
        gemm(kernel, &a, m, &pb, &mut c, ldc, false);
        for pass in 0..2 {
            for i in 0..m {
                for j in 0..n {
                    let got = c[i * ldc + j] as f64;
                    let w = want[i * n + j] * (pass + 1) as f64;
                    assert!(
                        (got - w).abs() <= tol[i * n + j] * (pass + 1) as f64,
                        "{} {m}×{n}×{k} pass {pass} ({i}, {j}): {got} vs {w}",
                        kernel.name()
                    );
                }
                for j in n..ldc {
                    assert_eq!(c[i * ldc + j], 7.0, "{}: wrote past n", kernel.name());
                }
            }
            gemm(kernel, &a, m, &pb, &mut c, ldc, true);
        }
    }
}

#[test]
fn packing_from_rows_and_from_columns_gives_the_generic_packing() {
    // Odd and even k, n past a panel, a source wider than the operand (ld > width).
    for (s, &(k, n)) in [(1, 1), (7, 5), (33, 17), (64, 160), (160, 64), (97, 70)]
        .iter()
        .enumerate()
    {
        let ld = n + 3;
        let src = random(k * ld, 40 + s as u64);
        let want = Panels::pack(k, n, |i, j| src[i * ld + j]);
        let got = Panels::from_rows(&src, k, n, ld);
        let ldt = k + 2;
        let srct = random(n * ldt, 50 + s as u64);
        let want_t = Panels::pack(k, n, |i, j| srct[j * ldt + i]);
        let got_t = Panels::from_cols(&srct, k, n, ldt);
        for (what, a, b) in [("rows", &got, &want), ("columns", &got_t, &want_t)] {
            assert_eq!(
                (a.k, a.n, a.kq, a.np),
                (b.k, b.n, b.kq, b.np),
                "{what} {k}×{n}"
            );
            assert!(
                as_u16(&a.data) == as_u16(&b.data),
                "{what} {k}×{n}: another packing"
            );
        }
    }
}

#[test]
fn packing_keeps_every_value_rounded_and_pads_with_zeros() {
    let (out, inp) = (37, 45);
    let w = random(out * inp, 9);
    let bw = Bf16Weight::new(&w, out, inp);
    assert_eq!(bw.dims(), (out, inp));
    let f = bw.to_f32();
    for o in 0..out {
        for i in 0..inp {
            let r = from_bf16(to_bf16(w[o * inp + i]));
            assert_eq!(f[o * inp + i], r);
            assert_eq!(bw.fwd().get(i, o), r, "Wᵀ");
            assert_eq!(bw.bwd().get(o, i), r, "W");
        }
    }
    // Padding: k to 32 (pair rows), n to 32 (two panels).
    let p = bw.fwd();
    assert_eq!((p.kq, p.np), (32, 4));
    assert_eq!(p.get(45, 0), 0.0);
    assert_eq!(p.get(0, 40), 0.0);
    // A task's rows: rounded, zeros past k and past m; a buffer reused from a wider product
    // is cleared.
    let x = random(5 * inp, 10);
    let mut buf = vec![Line([0xffff; 32]); 200];
    convert_block(&x, 5, inp, 0, 2, &mut buf);
    let get = |buf: &[Line], r: usize, c: usize| from_bf16(as_u16(buf)[r * 64 + c]);
    assert_eq!(buf.len(), 32 * 2);
    assert_eq!(get(&buf, 4, 44), from_bf16(to_bf16(x[4 * inp + 44])));
    assert_eq!(get(&buf, 4, 45), 0.0);
    assert_eq!(get(&buf, 31, 0), 0.0);
    // The CPU's conversion (where there is one) rounds to nearest even like `half`.
    let odd: Vec<f32> = (0..100).map(|i| 1.0 + i as f32 * 2f32.powi(-9)).collect();
    convert_block(&odd, 1, 100, 0, 4, &mut buf);
    for (i, &v) in odd.iter().enumerate() {
        assert_eq!(from_bf16(as_u16(&buf)[i]), from_bf16(to_bf16(v)), "{v}");
    }
}

#[test]
fn the_emulated_kernel_matches_the_reference() {
    check(Kernel::Emulated);
}

#[test]
fn the_avx512_bf16_kernel_matches_the_reference() {
    match Kernel::Avx512Bf16.available() {
        Ok(()) => check(Kernel::Avx512Bf16),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn the_amx_kernel_matches_the_reference() {
    match Kernel::AmxBf16.available() {
        Ok(()) => check(Kernel::AmxBf16),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn forward_and_backward_products_of_a_weight() {
    let (m, out, inp) = (19, 40, 70);
    let w = random(out * inp, 3);
    let x = random(m * inp, 4);
    let g = random(m * out, 5);
    let bw = Bf16Weight::new(&w, out, inp);
    let wt: Vec<f32> = (0..inp * out)
        .map(|t| w[(t % out) * inp + t / out])
        .collect();
    for kernel in [Kernel::Emulated, Kernel::best()] {
        if !kernel.is_bf16() {
            continue;
        }
        let y = forward(kernel, &x, m, &bw);
        let (want, tol) = reference(&x, &wt, m, out, inp);
        for (t, (&y, (&w, &e))) in y.iter().zip(want.iter().zip(&tol)).enumerate() {
            assert!(
                (y as f64 - w).abs() <= e,
                "{} y[{t}]: {y} vs {w}",
                kernel.name()
            );
        }
        let mut dx = vec![1f32; m * inp];
        backward_into(kernel, &g, m, &bw, &mut dx, true);
        let (want, tol) = reference(&g, &w, m, inp, out);
        for (t, (&d, (&w, &e))) in dx.iter().zip(want.iter().zip(&tol)).enumerate() {
            assert!(
                (d as f64 - 1.0 - w).abs() <= e + 1e-6,
                "{} dx[{t}]: {d} vs 1 + {w}",
                kernel.name()
            );
        }
    }
}

#[test]
fn kernel_names_parse_and_unavailable_ones_say_what_is_missing() {
    assert_eq!(
        KernelChoice::parse("f32").unwrap(),
        KernelChoice::all(Kernel::F32)
    );
    assert_eq!(
        KernelChoice::parse("emulated").unwrap().kernel,
        Kernel::Emulated
    );
    let auto = KernelChoice::parse("auto").unwrap();
    assert!(auto.auto && auto.min_dim == AUTO_MIN_DIM && auto.kernel == Kernel::best());
    assert_eq!(auto.for_weight(576, 192), auto.kernel);
    assert_eq!(auto.for_weight(64, 32), Kernel::F32);
    let e = KernelChoice::parse("fast").unwrap_err();
    assert!(e.contains("COLLM_KERNEL=fast") && e.contains("amx"), "{e}");
    for (name, k) in [("bf16", Kernel::Avx512Bf16), ("amx", Kernel::AmxBf16)] {
        match (k.available(), KernelChoice::parse(name)) {
            (Ok(()), Ok(c)) => assert_eq!(c.kernel, k),
            (Err(why), Err(e)) => assert!(e.contains(&why) && e.contains(name), "{e}"),
            (a, b) => panic!("{name}: available {a:?} but parse {b:?}"),
        }
    }
}

/// Not a test: the rates on SmolLM2's shapes (`cargo test --release -p collm-llm --lib
/// bf16::tests::rates -- --ignored --nocapture`).
#[test]
#[ignore]
fn rates() {
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let m = 1280;
        let f = crate::ops::cpu::gemm_gflops(m, n, k, 3);
        let mut line = format!("m {m} n {n} k {k}: f32 {f:.0} GF/s");
        for kernel in [Kernel::Avx512Bf16, Kernel::AmxBf16] {
            if kernel.available().is_ok() {
                let g = gflops(kernel, m, n, k, 3);
                line += &format!(", {} {g:.0} GF/s ({:.2}x)", kernel.name(), g / f);
            }
        }
        eprintln!("{line}");
    }
}

#[test]
fn native_kernels_agree_with_the_emulated_one_on_wide_products() {
    // Several column chunks and row blocks, on the pool's threads; and more row blocks than
    // twice the threads (one task per row block).
    for (m, seed) in [(70, 21), (330, 23)] {
        wide_product_agrees(m, seed);
    }
}

#[test]
fn weights_wider_than_the_cache_budget_are_swept_in_column_chunks_and_agree() {
    // Panels of twice the budget and a ragged last column: more than one chunk, each over
    // every row block.
    let k = 64;
    let pair_bytes = 2 * 32 * 64;
    let n = 32 * (2 * panel_budget() / pair_bytes + 3) - 5;
    wide_product_agrees_with(200, n, k, 25);
}

#[test]
fn task_plans_cover_every_block_once_in_chunks_that_fit() {
    let budget = panel_budget();
    for (row_blocks, pairs, pair_bytes, threads) in [
        (10, 50, budget / 8, 2),
        (10, 50, budget / 100, 2),
        (40, 48, budget / 3 + 1, 2),
        (1, 50, budget / 8, 2),
        (3, 7, budget * 2, 2),
    ] {
        let tasks = plan(row_blocks, pairs, pair_bytes, threads);
        let mut seen = vec![0u32; row_blocks * pairs];
        for &(rb, p0, p1) in &tasks {
            assert!(p0 < p1 && p1 <= pairs && rb < row_blocks);
            // A chunk of several pairs fits the budget (a single pair may not).
            assert!(p1 - p0 == 1 || (p1 - p0) * pair_bytes <= budget || row_blocks < 2 * threads);
            for p in p0..p1 {
                seen[rb * pairs + p] += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "{row_blocks} {pairs} {pair_bytes}"
        );
        if row_blocks >= 2 * threads && pairs * pair_bytes > budget {
            // Chunk-major: a chunk's row blocks come one after another.
            assert!(tasks[..row_blocks].iter().all(|t| t.1 == 0), "{tasks:?}");
        }
    }
    // Few rows: each row block split so that every thread has work.
    assert_eq!(plan(1, 20, 64, 2).len(), 20usize.div_ceil(PAIRS_PER_TASK));
}

fn wide_product_agrees(m: usize, seed: u64) {
    wide_product_agrees_with(m, 600, 576, seed)
}

fn wide_product_agrees_with(m: usize, n: usize, k: usize, seed: u64) {
    let a = random(m * k, seed);
    let b = random(k * n, seed + 1);
    let pb = Panels::pack(k, n, |i, j| b[i * n + j]);
    let product = |kernel| products(kernel, &a, m, &[&pb]).pop().unwrap();
    let want = product(Kernel::Emulated);
    let (exact, tol) = reference(&a, &b, m, n, k);
    for (t, (&w, (&e, &tl))) in want.iter().zip(exact.iter().zip(&tol)).enumerate() {
        assert!((w as f64 - e).abs() <= tl, "emulated [{t}]: {w} vs {e}");
    }
    for kernel in [Kernel::Avx512Bf16, Kernel::AmxBf16] {
        if let Err(why) = kernel.available() {
            eprintln!("skipped {}: {why}", kernel.name());
            continue;
        }
        let got = product(kernel);
        let worst = got
            .iter()
            .zip(&want)
            .zip(&tol)
            .map(|((g, w), t)| (g - w).abs() as f64 / t)
            .fold(0.0, f64::max);
        eprintln!("{}: worst error / bound {worst:.3}", kernel.name());
        assert!(worst <= 1.0, "{}: {worst}", kernel.name());
    }
}

#[test]
#[ignore]
fn kernel_only_rates() {
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let m = 1280;
        let a = random(m * k, 1);
        let b = random(k * n, 2);
        let pb = Panels::pack(k, n, |i, j| b[i * n + j]);
        let mut c = vec![0f32; m * n];
        let mut line = format!("m {m} n {n} k {k}:");
        for kernel in [Kernel::Avx512Bf16, Kernel::AmxBf16] {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                gemm(kernel, &a, m, &pb, &mut c, n, false);
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!(
                " {} {:.0} GF/s",
                kernel.name(),
                2.0 * (m * n * k) as f64 / best / 1e9
            );
        }
        eprintln!("{line}");
    }
}

/// Not a test: the MLP's gate and up products (1536 of 576, m = 1280; 3.5 MB of panels, swept
/// in column chunks) as two products into new buffers, and paired with the MLP's epilogue
/// (SwiGLU, gate and up kept) into reused ones (`cargo test --release -p collm-llm --lib
/// bf16::tests::paired_rates -- --ignored --nocapture --test-threads=1`).
#[test]
#[ignore]
fn paired_rates() {
    let (m, n, k) = (1280, 1536, 576);
    let kernel = Kernel::AmxBf16;
    if let Err(why) = kernel.available() {
        eprintln!("skipped: {why}");
        return;
    }
    let x = random(m * k, 1);
    let (wg, wu) = (random(k * n, 2), random(k * n, 3));
    let pg = Panels::pack(k, n, |i, j| wg[i * n + j]);
    let pu = Panels::pack(k, n, |i, j| wu[i * n + j]);
    let flop = 5.0 * 2.0 * 2.0 * (m * n * k) as f64;
    let mut outs = [vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]];
    let [a, g, u] = outs.each_mut().map(|o| Out(o.as_mut_ptr()));
    let each = |r0: usize, c0: usize, rows: usize, cols: usize, [gb, ub]: [&[f32; 1024]; 2]| {
        for r in 0..rows {
            let (gb, ub) = (&gb[r * 32..r * 32 + cols], &ub[r * 32..r * 32 + cols]);
            let at = (r0 + r) * n + c0;
            // SAFETY: inside the m×n buffers; each block position is handed out once.
            unsafe {
                let act = std::slice::from_raw_parts_mut(a.at(at), cols);
                for ((act, g), u) in act.iter_mut().zip(gb).zip(ub) {
                    *act = g * (1.0 / (1.0 + crate::ops::cpu::exp(-*g))) * u;
                }
                std::ptr::copy_nonoverlapping(gb.as_ptr(), g.at(at), cols);
                std::ptr::copy_nonoverlapping(ub.as_ptr(), u.at(at), cols);
            }
        }
    };
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for _ in 0..5 {
            std::hint::black_box(products(kernel, &x, m, &[&pg, &pu]));
        }
        let two = flop / t.elapsed().as_secs_f64() / 1e9;
        let t = std::time::Instant::now();
        for _ in 0..5 {
            blocks_each(kernel, &x, m, [&pg, &pu], &each);
        }
        let paired = flop / t.elapsed().as_secs_f64() / 1e9;
        eprintln!("two products {two:.0} GF/s, paired with SwiGLU {paired:.0} GF/s");
    }
    std::hint::black_box(&outs);
}
