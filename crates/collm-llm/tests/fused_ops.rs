//! Every fused op against its composed reference (forward values and gradients) and against
//! finite differences; the fused decoder against the composed one, end to end.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use collm_llm::ops::cpu::{self as ops, RopeTables};
use collm_llm::ops::reference as composed;
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use common::{max_diff, tiny};

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator: the tests must not depend on candle's CPU rng.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// 1 at a mask's real positions, 0 at padding, shaped `shape` (for comparing real rows only:
/// a padding row's output is never read).
fn real_rows(mask: &Mask, shape: impl Into<candle_core::Shape>) -> Tensor {
    let v: Vec<f32> = mask.data.iter().map(|&m| m as f32).collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// `sum(out · r)` for a fixed random `r`: a scalar whose gradient reaches every output.
fn probe(out: &Tensor, seed: u64) -> Tensor {
    out.mul(&randn(out.dims(), seed))
        .unwrap()
        .sum_all()
        .unwrap()
}

/// A decoder pass over `emb` with `lora` (in training with `train`: its dropout): the hidden
/// states at real positions, the logits of tokens 3, 4 and 9 at each row's last position, and
/// the gradients of a probe of them: the embeddings' at real positions, then each LoRA
/// variable's.
fn pass_outputs(
    dec: &Decoder,
    (emb, mask): (&Var, &Mask),
    lora: &Lora,
    train: Option<&collm_nn::TrainCtx>,
) -> Vec<Tensor> {
    let pass = Pass {
        lora: Some(lora),
        train,
        grad: true,
    };
    let h = dec.forward(emb.as_tensor(), mask, &pass).unwrap();
    let logits = dec
        .token_logits(&h, &mask.last_positions(), &[3, 4, 9], &pass)
        .unwrap();
    let g = probe(&logits, 5).backward().unwrap();
    // Only real positions: padding feeds nothing real.
    let real = real_rows(mask, (mask.batch, mask.seq, 1));
    let mut out = vec![
        h.broadcast_mul(&real).unwrap(),
        logits,
        g.get(emb.as_tensor())
            .unwrap()
            .broadcast_mul(&real)
            .unwrap(),
    ];
    for (_, v) in lora.trainable() {
        out.push(g.get(v.as_tensor()).unwrap().clone());
    }
    out
}

/// `max |a - b|` over the largest magnitude of `b` (at least 1e-3).
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    max_diff(a, b) / scale.to_scalar::<f32>().unwrap().max(1e-3)
}

/// Gradients of `f` with respect to each input, for values `xs`.
fn grads(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g = f(&ts).backward().unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
        .collect()
}

/// Central finite differences of `f` at a few coordinates of input `which`, against `grad`.
fn check_fd(xs: &[Tensor], which: usize, grad: &Tensor, f: &dyn Fn(&[Tensor]) -> Tensor) {
    let flat = xs[which].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = flat.len();
    let eps = 1e-2f32;
    for k in 0..6 {
        let i = (k * 7919 + 13) % n;
        let at = |d: f32| {
            let mut v = flat.clone();
            v[i] += d;
            let mut ys = xs.to_vec();
            ys[which] = Tensor::from_vec(v, xs[which].dims(), &DEV).unwrap();
            f(&ys).to_scalar::<f32>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let tol = 2e-2 * (1.0 + fd.abs());
        assert!(
            (fd - g[i]).abs() < tol,
            "input {which}, element {i}: finite difference {fd}, gradient {}",
            g[i]
        );
    }
}

/// Compares fused and composed: forward within `tol`, every input's gradient within `tol`,
/// and the fused gradients against finite differences.
fn compare(
    xs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let d = max_diff(&fused(xs), &reference(xs));
    assert!(d < tol, "forward differs by {d}");
    let f = |t: &[Tensor]| probe(&fused(t), 99);
    let r = |t: &[Tensor]| probe(&reference(t), 99);
    let gf = grads(xs, &f);
    let gr = grads(xs, &r);
    for (k, (a, b)) in gf.iter().zip(&gr).enumerate() {
        let d = max_diff(a, b);
        assert!(d < tol, "gradient of input {k} differs by {d}");
        check_fd(xs, k, a, &f);
    }
}

#[test]
fn rms_norm_matches_composed() {
    let xs = [randn(&[3, 5, 16], 1), (randn(&[16], 2) + 1.5).unwrap()];
    compare(
        &xs,
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        &|t| composed::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        1e-5,
    );
}

#[test]
fn rope_matches_composed_for_left_and_right_padding() {
    let (b, t, heads, hd) = (2, 6, 3, 8);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    for mask in [
        Mask::left_padded(&[6, 4], t),
        Mask::right_padded(&[3, 6], t),
    ] {
        let pos = mask.position_ids();
        let tables = RopeTables::new(&pos, &inv);
        let p = Tensor::from_vec(pos.clone(), (b, t, 1), &DEV).unwrap();
        let inv_t = Tensor::from_vec(inv.clone(), (1, 1, hd / 2), &DEV).unwrap();
        let f = p.broadcast_mul(&inv_t).unwrap();
        let f = Tensor::cat(&[&f, &f], 2).unwrap().unsqueeze(2).unwrap();
        let (cos, sin) = (f.cos().unwrap(), f.sin().unwrap());
        compare(
            &[randn(&[b, t, heads, hd], 3)],
            &|x| ops::rope(&x[0], &tables).unwrap(),
            &|x| composed::rope(&x[0], &cos, &sin).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn swiglu_matches_composed() {
    compare(
        &[randn(&[4, 33], 4), randn(&[4, 33], 5)],
        &|t| ops::swiglu(&t[0], &t[1]).unwrap(),
        &|t| composed::swiglu(&t[0], &t[1]).unwrap(),
        1e-5,
    );
}

/// The fused attention against the composed one on `xs` (q, k, v) under `km`, comparing the
/// real query rows (`real`) only: a padding row's output is never read.
fn compare_attention(xs: &[Tensor], km: &Mask, real: &Tensor) {
    let bias = composed::attention_bias(km, DType::F32, &DEV).unwrap();
    compare(
        xs,
        &|x| {
            ops::attention(&x[0], &x[1], &x[2], km, None)
                .unwrap()
                .broadcast_mul(real)
                .unwrap()
        },
        &|x| {
            composed::attention(&x[0], &x[1], &x[2], &bias)
                .unwrap()
                .broadcast_mul(real)
                .unwrap()
        },
        1e-5,
    );
}

#[test]
fn attention_matches_composed_with_grouped_heads_and_padding() {
    // T = 7 fits one block of query rows; T = 70 spans three, with padding that starts and
    // ends inside blocks.
    let (b, hd) = (3, 8);
    for (t, heads, kv_heads, lens) in [
        (7, 4, 2, [7, 4, 1]),
        (7, 2, 2, [2, 7, 5]),
        (7, 3, 1, [7, 1, 6]),
        (70, 4, 2, [70, 45, 5]),
        (70, 3, 3, [33, 70, 64]),
    ] {
        for mask in [Mask::left_padded(&lens, t), Mask::right_padded(&lens, t)] {
            let xs = [
                randn(&[b, t, heads, hd], 6),
                randn(&[b, t, kv_heads, hd], 7),
                randn(&[b, t, kv_heads, hd], 8),
            ];
            compare_attention(&xs, &mask, &real_rows(&mask, (b, t, 1, 1)));
        }
    }
}

#[test]
fn attention_on_heads_side_by_side_matches_the_4d_op() {
    let (b, t, heads, kv_heads, hd) = (2, 9, 6, 2, 4);
    let mask = Mask::left_padded(&[9, 5], t);
    let km = mask.clone();
    let real = real_rows(&mask, (b, t, 1));
    let xs = [
        randn(&[b, t, heads * hd], 1),
        randn(&[b, t, kv_heads * hd], 2),
        randn(&[b, t, kv_heads * hd], 3),
    ];
    compare(
        &xs,
        &|x| {
            let out = ops::attention_flat(
                &x[0],
                &x[1],
                &x[2],
                (heads, kv_heads),
                &km,
                None,
                collm_llm::ops::Kernel::F32,
            );
            let out = out.unwrap();
            assert_eq!(out.dims(), &[b, t, heads * hd]);
            out.broadcast_mul(&real).unwrap()
        },
        &|x| {
            let four = |x: &Tensor, n: usize| x.reshape((b, t, n, hd)).unwrap();
            ops::attention(
                &four(&x[0], heads),
                &four(&x[1], kv_heads),
                &four(&x[2], kv_heads),
                &km,
                None,
            )
            .unwrap()
            .reshape((b, t, heads * hd))
            .unwrap()
            .broadcast_mul(&real)
            .unwrap()
        },
        1e-6,
    );
    // Widths that do not split into the heads are refused.
    assert!(ops::attention_flat(
        &xs[0],
        &xs[1],
        &xs[2],
        (5, 2),
        &km,
        None,
        collm_llm::ops::Kernel::F32
    )
    .is_err());
}

#[test]
fn attention_matches_composed_with_holes_in_the_mask() {
    // Not left or right padding: masked keys between real ones (the kernel's general path).
    let (b, t, heads, kv_heads, hd) = (2, 9, 4, 2, 8);
    let data = vec![
        0, 1, 1, 0, 1, 0, 0, 1, 1, //
        1, 0, 1, 1, 1, 0, 1, 1, 0,
    ];
    let real = Tensor::from_vec(
        data.iter().map(|&m| m as f32).collect::<Vec<_>>(),
        (b, t, 1, 1),
        &DEV,
    )
    .unwrap();
    let km = Mask {
        data: std::sync::Arc::new(data),
        batch: b,
        seq: t,
    };
    let xs = [
        randn(&[b, t, heads, hd], 6),
        randn(&[b, t, kv_heads, hd], 7),
        randn(&[b, t, kv_heads, hd], 8),
    ];
    compare_attention(&xs, &km, &real);
}

#[test]
fn attention_gives_padding_rows_zeros_and_no_nan() {
    let mask = Mask::left_padded(&[1], 4);
    let km = mask.clone();
    let q = randn(&[1, 4, 2, 4], 1);
    let kv = randn(&[1, 4, 1, 4], 2);
    let out = ops::attention(&q, &kv, &kv, &km, None).unwrap();
    let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v[..3 * 8].iter().all(|x| *x == 0.0));
    // The one real row attends to itself only: its output is its own value vector.
    let last = out.get(0).unwrap().get(3).unwrap().get(1).unwrap();
    let own = kv.get(0).unwrap().get(3).unwrap().get(0).unwrap();
    assert!(max_diff(&last, &own) < 1e-6);
}

#[test]
fn attention_with_rope_inside_matches_rope_then_attention() {
    let (b, t, heads, kv_heads, hd) = (2, 5, 4, 2, 8);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let mask = Mask::left_padded(&[5, 3], t);
    let tables = RopeTables::new(&mask.position_ids(), &inv);
    let km = mask.clone();
    let real = real_rows(&mask, (b, t, 1, 1));
    let xs = [
        randn(&[b, t, heads, hd], 1),
        randn(&[b, t, kv_heads, hd], 2),
        randn(&[b, t, kv_heads, hd], 3),
    ];
    compare(
        &xs,
        &|x| {
            ops::attention(&x[0], &x[1], &x[2], &km, Some(&tables))
                .unwrap()
                .broadcast_mul(&real)
                .unwrap()
        },
        &|x| {
            let q = ops::rope(&x[0], &tables).unwrap();
            let k = ops::rope(&x[1], &tables).unwrap();
            ops::attention(&q, &k, &x[2], &km, None)
                .unwrap()
                .broadcast_mul(&real)
                .unwrap()
        },
        1e-5,
    );
}

/// The fused projection with LoRA of rank `r` (and dropout p = 0.3, and none) against the
/// composed ops, forward and every gradient, for an input `lead` × `inp`.
fn lora_linear_matches_the_composed_ops(lead: &[usize], inp: usize, r: usize, tol: f32) {
    use rand::SeedableRng;
    let rows: usize = lead.iter().product();
    let dims = |last: usize| [lead, &[last]].concat();
    let x = randn(&dims(inp), 1);
    let w = randn(&[5, inp], 2);
    let b = randn(&[5], 3);
    let a = randn(&[r, inp], 4);
    let bm = randn(&[5, r], 5);
    let scaling = 2.0;
    // The same draws on both sides: the fused op applies the mask itself.
    let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for p in [0.0, 0.3] {
        let fused = |t: &[Tensor]| {
            let dropout = (p > 0.0).then(|| ops::dropout_mask(rows * inp, p, &mut rng()).unwrap());
            let lora = ops::LoraPath {
                a: &t[1],
                b: &t[2],
                scaling,
                dropout,
            };
            ops::linear(&t[0], &w, Some(&b), Some(lora)).unwrap()
        };
        let reference = |t: &[Tensor]| {
            let flat = t[0].reshape((rows, inp)).unwrap();
            let xd = if p > 0.0 {
                ops::dropout(&flat, p, &mut rng()).unwrap()
            } else {
                flat.clone()
            };
            let low = (xd.matmul(&t[1].t().unwrap()).unwrap() * scaling).unwrap();
            (flat
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                + low.matmul(&t[2].t().unwrap()).unwrap())
            .unwrap()
            .reshape(dims(5))
            .unwrap()
        };
        compare(&[x.clone(), a.clone(), bm.clone()], &fused, &reference, tol);
    }
}

#[test]
fn linear_with_lora_and_dropout_matches_the_composed_ops_and_gives_the_weight_no_gradient() {
    use rand::SeedableRng;
    // Rows of 12 (the mask read bit by bit) and of 64 over 45 rows (32 bits at a time, more
    // rows than one parallel task).
    // Ranks 13 (dot products 8, 4 and 1 at a time) and 3. The larger case's values reach ~100
    // (dB sums 45 rows of 13-term products): its tolerance is 1e-6 of that.
    lora_linear_matches_the_composed_ops(&[15, 3], 64, 13, 1e-4);
    lora_linear_matches_the_composed_ops(&[2, 3], 12, 3, 1e-5);
    let x = randn(&[2, 3, 12], 1);
    let w = randn(&[5, 12], 2);
    let a = randn(&[4, 12], 4);
    let bm = randn(&[5, 4], 5);
    let scaling = 2.0;
    let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(7);
    // The mask is really applied: some inputs drop out of the LoRA term.
    let lora_term = |dropout| {
        let lora = ops::LoraPath {
            a: &a,
            b: &bm,
            scaling,
            dropout,
        };
        (ops::linear(&x, &w, None, Some(lora)).unwrap() - ops::linear(&x, &w, None, None).unwrap())
            .unwrap()
    };
    let kept = lora_term(None);
    let dropped = lora_term(Some(ops::dropout_mask(72, 0.5, &mut rng()).unwrap()));
    assert!(max_diff(&kept, &dropped) > 1e-3);
    // A mask for another input size is refused.
    let wrong = ops::LoraPath {
        a: &a,
        b: &bm,
        scaling,
        dropout: Some(ops::dropout_mask(72 + 64, 0.5, &mut rng()).unwrap()),
    };
    assert!(ops::linear(&x, &w, None, Some(wrong)).is_err());
    // Without LoRA and bias too; a frozen weight gets nothing.
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = ops::linear(xv.as_tensor(), wv.as_tensor(), None, None).unwrap();
    assert_eq!(y.dims(), &[2, 3, 5]);
    let want = x.reshape((6, 12)).unwrap().matmul(&w.t().unwrap()).unwrap();
    assert!(max_diff(&y.reshape((6, 5)).unwrap(), &want) < 1e-5);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(xv.as_tensor()).is_some());
    assert!(g.get(wv.as_tensor()).is_none());
}

#[test]
fn mlp_matches_the_separate_ops_and_the_composed_ones() {
    let x = randn(&[2, 3, 12], 1);
    let (wg, wu, wd) = (
        (randn(&[20, 12], 2) * 0.5).unwrap(),
        (randn(&[20, 12], 3) * 0.5).unwrap(),
        (randn(&[12, 20], 4) * 0.5).unwrap(),
    );
    let fused = |t: &[Tensor]| ops::mlp(&t[0], &wg, &wu, &wd).unwrap();
    let composed = |t: &[Tensor]| {
        let proj = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let act = composed::swiglu(&proj(&t[0], &wg), &proj(&t[0], &wu)).unwrap();
        proj(&act, &wd)
    };
    compare(std::slice::from_ref(&x), &fused, &composed, 1e-5);
    // The same as the separate fused ops, and bf16 follows f32.
    let separate = |x: &Tensor, dtype: DType| {
        let w = |w: &Tensor| w.to_dtype(dtype).unwrap();
        let act = ops::swiglu(
            &ops::linear(x, &w(&wg), None, None).unwrap(),
            &ops::linear(x, &w(&wu), None, None).unwrap(),
        )
        .unwrap();
        ops::linear(&act, &w(&wd), None, None).unwrap()
    };
    let sep = separate(&x, DType::F32);
    assert!(max_diff(&fused(std::slice::from_ref(&x)), &sep) < 1e-6);
    let grad_of = |dtype: DType| {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let w = |w: &Tensor| w.to_dtype(dtype).unwrap();
        let y = ops::mlp(xv.as_tensor(), &w(&wg), &w(&wu), &w(&wd)).unwrap();
        assert_eq!(y.dtype(), dtype);
        let g = probe(&y.to_dtype(DType::F32).unwrap(), 5)
            .backward()
            .unwrap();
        let gx = g.get(xv.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        (y.to_dtype(DType::F32).unwrap(), gx)
    };
    let (y32, g32) = grad_of(DType::F32);
    let (y16, g16) = grad_of(DType::BF16);
    let bf = separate(&x.to_dtype(DType::BF16).unwrap(), DType::BF16);
    assert_eq!(
        max_diff(&y16, &bf.to_dtype(DType::F32).unwrap()),
        0.0,
        "bf16 rounds as the separate ops"
    );
    assert!(max_diff(&y16, &y32) < 0.05, "{}", max_diff(&y16, &y32));
    assert!(max_diff(&g16, &g32) < 0.05, "{}", max_diff(&g16, &g32));
    // Weights that do not chain are refused.
    assert!(ops::mlp(&x, &wg, &wu, &wg).is_err());
}

#[test]
fn dropout_draws_what_the_composed_dropout_draws_and_reuses_its_mask_backwards() {
    // More elements than one parallel chunk, and not a multiple of 64.
    let x = Var::from_tensor(&(randn(&[41, 1000], 1) + 3.0).unwrap()).unwrap();
    let ctx = collm_nn::TrainCtx::new(42);
    let reference = collm_nn::TrainCtx::new(42);
    for _ in 0..2 {
        // Two calls in a row: the generator must end where the sequential draws leave it.
        let y = ops::dropout(x.as_tensor(), 0.25, &mut ctx.rng.borrow_mut()).unwrap();
        let want = collm_nn::layers::dropout(x.as_tensor(), 0.25, Some(&reference)).unwrap();
        assert_eq!(
            max_diff(&y, &want),
            0.0,
            "same masks as the composed dropout"
        );
    }
    // From an even word position inside a block (a 64-bit draw before each of two calls).
    use rand::RngCore;
    let (ctx2, reference2) = (collm_nn::TrainCtx::new(7), collm_nn::TrainCtx::new(7));
    for _ in 0..2 {
        ctx2.rng.borrow_mut().next_u64();
        reference2.rng.borrow_mut().next_u64();
        let y = ops::dropout(x.as_tensor(), 0.25, &mut ctx2.rng.borrow_mut()).unwrap();
        let want = collm_nn::layers::dropout(x.as_tensor(), 0.25, Some(&reference2)).unwrap();
        assert_eq!(max_diff(&y, &want), 0.0, "same masks from inside a block");
    }
    // From an odd word position (a 32-bit draw before): draws straddle ChaCha's blocks.
    ctx.rng.borrow_mut().next_u32();
    reference.rng.borrow_mut().next_u32();
    let y = ops::dropout(x.as_tensor(), 0.25, &mut ctx.rng.borrow_mut()).unwrap();
    let want = collm_nn::layers::dropout(x.as_tensor(), 0.25, Some(&reference)).unwrap();
    assert_eq!(max_diff(&y, &want), 0.0, "same masks from an odd position");
    let y = ops::dropout(x.as_tensor(), 0.25, &mut ctx.rng.borrow_mut()).unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dropped = yv.iter().filter(|v| **v == 0.0).count() as f64 / yv.len() as f64;
    assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
    // d(sum y)/dx is the mask itself: 0 where dropped, 1/(1-p) where kept.
    let g = y.sum_all().unwrap().backward().unwrap();
    let gv = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (g, y) in gv.iter().zip(&yv) {
        assert_eq!(*g == 0.0, *y == 0.0);
        assert!(*g == 0.0 || (g - 1.0 / 0.75).abs() < 1e-6);
    }
}

#[test]
fn bf16_ops_follow_the_f32_ones() {
    let x = randn(&[4, 32], 1);
    let w = (randn(&[32], 2) + 1.0).unwrap();
    let y32 = ops::rms_norm(&x, &w, 1e-5).unwrap();
    let y16 = ops::rms_norm(
        &x.to_dtype(DType::BF16).unwrap(),
        &w.to_dtype(DType::BF16).unwrap(),
        1e-5,
    )
    .unwrap();
    assert_eq!(y16.dtype(), DType::BF16);
    assert!(max_diff(&y16.to_dtype(DType::F32).unwrap(), &y32) < 0.05);
    let g = randn(&[4, 32], 3);
    let s32 = ops::swiglu(&x, &g).unwrap();
    let s16 = ops::swiglu(
        &x.to_dtype(DType::BF16).unwrap(),
        &g.to_dtype(DType::BF16).unwrap(),
    )
    .unwrap();
    assert!(max_diff(&s16.to_dtype(DType::F32).unwrap(), &s32) < 0.02);
    // The projection and its input gradient, bf16 against f32.
    let w = (randn(&[24, 32], 4) * 0.2).unwrap();
    let grad_of = |dtype: DType| {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let y = ops::linear(xv.as_tensor(), &w.to_dtype(dtype).unwrap(), None, None).unwrap();
        assert_eq!(y.dtype(), dtype);
        let loss = probe(&y.to_dtype(DType::F32).unwrap(), 7);
        let g = loss.backward().unwrap();
        let gx = g.get(xv.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        (y.to_dtype(DType::F32).unwrap(), gx)
    };
    let (y32, g32) = grad_of(DType::F32);
    let (y16, g16) = grad_of(DType::BF16);
    assert!(max_diff(&y16, &y32) < 0.05, "{}", max_diff(&y16, &y32));
    assert!(max_diff(&g16, &g32) < 0.05, "{}", max_diff(&g16, &g32));
}

#[test]
fn fused_decoder_matches_the_composed_one_forward_and_backward() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let mut dec = tiny(name);
        assert!(dec.is_fused(), "the CPU default is the fused path");
        let cfg = LoraConfig {
            target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
            ..Default::default()
        };
        let lora = Lora::new(&cfg, &dec.config, 3, &DEV).unwrap();
        // B starts at zero; give it values so that every LoRA path carries signal.
        for (_, v) in lora.trainable() {
            v.set(&(randn(v.dims(), 11) * 0.05).unwrap()).unwrap();
        }
        let seqs = [vec![5u32, 6, 7, 8, 9, 10], vec![11u32, 12, 13]];
        let (emb, mask) = dec.embed_left_padded(&seqs, 0).unwrap();
        let emb = Var::from_tensor(&emb).unwrap();
        let fused = pass_outputs(&dec, (&emb, &mask), &lora, None);
        dec.set_fused(false).unwrap();
        let reference = pass_outputs(&dec, (&emb, &mask), &lora, None);
        for (k, (a, b)) in fused.iter().zip(&reference).enumerate() {
            let d = relative_diff(a, b);
            assert!(d < 1e-4, "{name}: output {k} differs by {d} (relative)");
        }
    }
}

#[test]
fn skipping_padding_leaves_every_real_position_forward_and_backward() {
    // Rows of 6, 3 and 1 real tokens, left-padded, and a mask with holes (what a suffix batch
    // may hold), LoRA on every projection with dropout in training: the blocks on the real
    // positions only give the hidden states, logits and gradients of every position computed,
    // within f32 rounding (each op but attention acts on each position alone, attention masks
    // padding out; a product over fewer rows may block its sums otherwise, and LoRA's weight
    // gradients leave the padding's zeros out), with the same dropout masks: a mask that
    // differed at any real position would move the logits by far more.
    for name in ["tiny-llama", "tiny-qwen2"] {
        let mut dec = tiny(name);
        let cfg = LoraConfig {
            target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
            dropout: 0.3,
            ..Default::default()
        };
        let lora = Lora::new(&cfg, &dec.config, 3, &DEV).unwrap();
        for (_, v) in lora.trainable() {
            v.set(&(randn(v.dims(), 11) * 0.05).unwrap()).unwrap();
        }
        let seqs = [vec![5u32, 6, 7, 8, 9, 10], vec![11u32, 12, 13], vec![14u32]];
        let (emb, left) = dec.embed_left_padded(&seqs, 0).unwrap();
        let holes = Mask {
            batch: 3,
            seq: left.seq,
            data: std::sync::Arc::new(
                [[1, 1, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1]].concat(),
            ),
        };
        let emb = Var::from_tensor(&emb).unwrap();
        for mask in [left, holes] {
            let run = |dec: &Decoder| {
                let ctx = collm_nn::TrainCtx::new(9);
                pass_outputs(dec, (&emb, &mask), &lora, Some(&ctx))
            };
            assert!(dec.is_fused());
            let skipped = run(&dec);
            dec.set_skip_padding(false);
            let every = run(&dec);
            dec.set_skip_padding(true);
            let names = ["hidden states", "logits", "embedding gradient"];
            for (k, (a, b)) in skipped.iter().zip(&every).enumerate() {
                let what = names.get(k).copied().unwrap_or("a LoRA gradient");
                let d = relative_diff(a, b);
                assert!(d < 1e-5, "{name}: {what} differs by {d} (relative)");
            }
        }
    }
}

#[test]
fn fused_decoder_trains_with_dropout_reproducibly() {
    let dec = tiny("tiny-llama");
    let lora = Lora::new(&LoraConfig::default(), &dec.config, 3, &DEV).unwrap();
    let seqs = [vec![5u32, 6, 7, 8], vec![11u32, 12]];
    let (emb, mask) = dec.embed_left_padded(&seqs, 0).unwrap();
    let logits = |dec: &Decoder, seed: u64| {
        let ctx = collm_nn::TrainCtx::new(seed);
        let pass = Pass {
            lora: Some(&lora),
            train: Some(&ctx),
            grad: true,
        };
        let h = dec.forward(&emb, &mask, &pass).unwrap();
        dec.token_logits(&h, &mask.last_positions(), &[3], &pass)
            .unwrap()
    };
    for (_, v) in lora.trainable() {
        v.set(&(randn(v.dims(), 11) * 0.5).unwrap()).unwrap();
    }
    let a = logits(&dec, 1);
    assert_eq!(max_diff(&a, &logits(&dec, 1)), 0.0, "same seed, same masks");
    assert!(
        max_diff(&a, &logits(&dec, 2)) > 0.0,
        "another seed, other masks"
    );
    // The composed decoder draws the same masks from the same seed.
    let mut composed = tiny("tiny-llama");
    composed.set_fused(false).unwrap();
    let d = max_diff(&a, &logits(&composed, 1));
    assert!(d < 1e-4, "fused vs composed in training mode: {d}");
}

#[test]
fn prefix_attention_matches_the_composed_one_forward_and_backward() {
    // 4 suffix rows of 5 (5, 2, 4, 3 real) over two prefixes (7 and 3 tokens: rows 0-2
    // continue the first, row 3 the second), 4 query heads over 2 kv heads; the suffixes
    // left-padded, right-padded (each one run of real keys: the kernel's fast path), and with
    // holes (the general path).
    let (n, ts) = (4, 5);
    let holes = Mask {
        batch: n,
        seq: ts,
        data: std::sync::Arc::new(
            [
                [1, 1, 1, 1, 1],
                [1, 0, 0, 1, 0],
                [0, 1, 1, 0, 1],
                [1, 0, 1, 1, 0],
            ]
            .concat(),
        ),
    };
    for mask in [
        Mask::left_padded(&[5, 2, 4, 3], ts),
        Mask::right_padded(&[5, 2, 4, 3], ts),
        holes,
    ] {
        prefix_attention_case(mask);
    }
}

fn prefix_attention_case(mask: Mask) {
    let (n, ts, nh, nkv, hd) = (mask.batch, mask.seq, 4, 2, 8);
    let prefixes = [
        (randn(&[nkv, hd, 7], 4), randn(&[nkv, 7, hd], 5), 3usize),
        (randn(&[nkv, hd, 3], 6), randn(&[nkv, 3, hd], 7), 1usize),
    ];
    let km = mask.clone();
    let bias = composed::attention_bias(&km, DType::F32, &DEV).unwrap();
    // Padding query rows are unspecified: compare (and probe) the real ones.
    let real = real_rows(&mask, (n, ts, 1, 1));
    let fused = |t: &[Tensor]| {
        let groups: Vec<(&Tensor, &Tensor, usize)> =
            prefixes.iter().map(|(k, v, c)| (k, v, *c)).collect();
        ops::prefix_attention(&t[0], &t[1], &t[2], &km, &groups)
            .unwrap()
            .broadcast_mul(&real)
            .unwrap()
    };
    let reference = |t: &[Tensor]| {
        let mut outs = Vec::new();
        let mut row = 0;
        for (pk, pv, c) in &prefixes {
            let part = |x: &Tensor| x.narrow(0, row, *c).unwrap();
            outs.push(
                composed::prefix_attention(
                    &part(&t[0]),
                    &part(&t[1]),
                    &part(&t[2]),
                    &part(&bias),
                    pk,
                    pv,
                )
                .unwrap(),
            );
            row += c;
        }
        Tensor::cat(&outs, 0).unwrap().broadcast_mul(&real).unwrap()
    };
    let xs = [
        randn(&[n, ts, nh, hd], 1),
        randn(&[n, ts, nkv, hd], 2),
        randn(&[n, ts, nkv, hd], 3),
    ];
    compare(&xs, &fused, &reference, 1e-5);
    // Shapes that do not fit are refused, naming the op.
    let err = ops::prefix_attention(
        &xs[0],
        &xs[1],
        &xs[2],
        &km,
        &[(&prefixes[0].0, &prefixes[0].1, 3)],
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("prefix attention"), "{err}");
}
