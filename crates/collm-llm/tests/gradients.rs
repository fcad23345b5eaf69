//! Every op on the training path has a backward pass: LoRA tensors and injected input
//! embeddings get non-zero finite gradients, and those gradients agree with finite differences.

mod common;

use candle_core::{Device, Tensor, Var};
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use collm_nn::optim::{Adam, Decay};
use collm_nn::TrainCtx;
use common::tiny;

/// A left-padded batch whose second row has an injected (trainable) embedding at position 2.
fn batch(dec: &Decoder, slot: &Var) -> (Tensor, Mask) {
    let seqs = [vec![5u32, 6, 7, 8, 9], vec![10u32, 11, 12]];
    let (emb, mask) = dec.embed_left_padded(&seqs, 0).unwrap();
    // Row 1 is left-padded by 2: its third real token sits at position 4.
    let rows: Vec<Tensor> = (0..2).map(|r| emb.get(r).unwrap()).collect();
    let r1 = Tensor::cat(
        &[
            &rows[1].narrow(0, 0, 4).unwrap(),
            &slot.as_tensor().unsqueeze(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    (Tensor::stack(&[&rows[0], &r1], 0).unwrap(), mask)
}

fn loss(dec: &Decoder, lora: &Lora, slot: &Var, ctx: Option<&TrainCtx>) -> Tensor {
    let (emb, mask) = batch(dec, slot);
    let pass = Pass {
        lora: Some(lora),
        train: ctx,
        grad: true,
    };
    let h = dec.forward(&emb, &mask, &pass).unwrap();
    let logits = dec
        .token_logits(&h, &mask.last_positions(), &[3, 4], &pass)
        .unwrap();
    // Any scalar that depends on every row will do.
    let w = Tensor::new(&[[1.0f32, -0.5], [0.7, 0.2]], &Device::Cpu).unwrap();
    logits.mul(&w).unwrap().sum_all().unwrap()
}

#[test]
fn lora_and_injected_embeddings_get_gradients_after_a_step() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dec = tiny(name);
        let cfg = LoraConfig {
            target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
            ..Default::default()
        };
        let lora = Lora::new(&cfg, &dec.config, 7, &Device::Cpu).unwrap();
        let slot = Var::from_tensor(&dec.embed(&[12]).unwrap().squeeze(0).unwrap()).unwrap();
        let params: Vec<_> = lora
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v, 1e-3))
            .collect();
        let mut opt = Adam::new(params, 1e-2, Decay::Decoupled).unwrap();
        let ctx = TrainCtx::new(1);
        // Step 1: B starts at zero, so only B gets a gradient; after the step A does too.
        let g = loss(&dec, &lora, &slot, Some(&ctx)).backward().unwrap();
        opt.step(&g).unwrap();
        let g = loss(&dec, &lora, &slot, Some(&ctx)).backward().unwrap();
        for (n, v) in lora.trainable() {
            let grad = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no grad for {n}"));
            let vals = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(vals.iter().all(|x| x.is_finite()), "{name}: {n}");
            assert!(vals.iter().any(|x| *x != 0.0), "{name}: zero grad for {n}");
        }
        let sg = g
            .get(slot.as_tensor())
            .expect("injected embedding gets a gradient");
        let vals = sg.to_vec1::<f32>().unwrap();
        assert!(vals.iter().all(|x| x.is_finite()) && vals.iter().any(|x| *x != 0.0));
    }
}

#[test]
fn gradients_agree_with_finite_differences() {
    let dec = tiny("tiny-llama");
    let cfg = LoraConfig {
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    let lora = Lora::new(&cfg, &dec.config, 3, &Device::Cpu).unwrap();
    // Give every B random values so that every A matters: seeded, so that the check is the
    // same every run (candle's own generator is not seeded, and a draw could put an entry where
    // the central difference at eps = 1e-2 misses the slope by more than the tolerance).
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (n, v) in lora.trainable() {
        if n.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.gen_range(-0.5f32..0.5))
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let slot = Var::from_tensor(&dec.embed(&[12]).unwrap().squeeze(0).unwrap()).unwrap();
    let grads = loss(&dec, &lora, &slot, None).backward().unwrap();
    let mut targets: Vec<(String, Var)> = lora.trainable();
    targets.push(("injected embedding".into(), slot.clone()));
    let eps = 1e-2f32;
    let mut checked = 0;
    for (name, var) in targets {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The largest-gradient entry of each tensor: well above f32 noise.
        let k = (0..analytic.len())
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        let eval_at = |delta: f32| -> f32 {
            let mut v = base.clone();
            v[k] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = loss(&dec, &lora, &slot, None).to_scalar::<f32>().unwrap();
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            l
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps);
        let rel = (numeric - analytic[k]).abs() / analytic[k].abs().max(1e-3);
        assert!(
            rel < 2e-2,
            "{name}[{k}]: analytic {} numeric {numeric}",
            analytic[k]
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * 3 * 2 + 1);
}
