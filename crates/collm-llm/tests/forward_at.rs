//! `Decoder::forward_at`: the last block computed at one position per row only. Its logits
//! equal the whole pass's at those positions (any real position, left and right padding,
//! grouped-query heads and attention biases, LoRA on every projection, fused and composed
//! paths), and in training it draws the same LoRA dropout masks and gives the same gradients.

mod common;

use candle_core::{Device, Tensor, Var};
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use common::{max_diff, tiny};
use rand_chacha::ChaCha8Rng;

const DEV: Device = Device::Cpu;

fn lora(dec: &Decoder, dropout: f64) -> Lora {
    let cfg = LoraConfig {
        target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
        dropout,
        ..Default::default()
    };
    let lora = Lora::new(&cfg, &dec.config, 3, &DEV).unwrap();
    // B starts at zero; give every factor values so that every LoRA path carries signal.
    for (k, (_, v)) in lora.trainable().into_iter().enumerate() {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|i| (((i * 7 + k * 13) % 17) as f32 - 8.0) * 0.01)
            .collect();
        v.set(&Tensor::from_vec(vals, v.dims(), &DEV).unwrap())
            .unwrap();
    }
    lora
}

/// Three rows of 7, 3 and 5 tokens, padded on the left or the right.
fn batch(dec: &Decoder, right: bool) -> (Tensor, Mask) {
    let seqs = [
        vec![5u32, 6, 7, 8, 9, 10, 11],
        vec![12u32, 13, 14],
        vec![15u32, 16, 17, 18, 19],
    ];
    let seq = 7;
    let mut ids = Vec::new();
    for s in &seqs {
        let pad = std::iter::repeat_n(0, seq - s.len());
        if right {
            ids.extend_from_slice(s);
            ids.extend(pad);
        } else {
            ids.extend(pad);
            ids.extend_from_slice(s);
        }
    }
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let e = dec
        .embed(&ids)
        .unwrap()
        .reshape((3, seq, dec.hidden_size()))
        .unwrap();
    let mask = if right {
        Mask::right_padded(&lens, seq)
    } else {
        Mask::left_padded(&lens, seq)
    };
    (e, mask)
}

/// Token logits at `positions` from a whole pass and from `forward_at`.
fn both(
    dec: &Decoder,
    e: &Tensor,
    mask: &Mask,
    pass: &Pass,
    positions: &[usize],
) -> (Tensor, Tensor) {
    let whole = dec.forward(e, mask, pass).unwrap();
    let whole = dec
        .token_logits(&whole, positions, &[3, 4, 9], pass)
        .unwrap();
    let at = dec.forward_at(e, mask, pass, positions).unwrap();
    assert_eq!(at.dims(), &[3, 1, dec.hidden_size()]);
    let at = dec.token_logits(&at, &[0, 0, 0], &[3, 4, 9], pass).unwrap();
    (whole, at)
}

#[test]
fn forward_at_gives_the_whole_pass_logits_at_any_real_position() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        for fused in [true, false] {
            let mut dec = tiny(name);
            dec.set_fused(fused).unwrap();
            let lora = lora(&dec, 0.0);
            for right in [false, true] {
                let (e, mask) = batch(&dec, right);
                let last = mask.last_positions();
                // Each row's first real token, and one in its middle.
                let first: Vec<usize> = (0..3)
                    .map(|b| (0..7).find(|&t| mask.data[b * 7 + t] == 1).unwrap())
                    .collect();
                let middle: Vec<usize> =
                    first.iter().zip(&last).map(|(f, l)| (f + l) / 2).collect();
                for positions in [&last, &first, &middle] {
                    let pass = Pass {
                        lora: Some(&lora),
                        train: None,
                        grad: false,
                    };
                    let (whole, at) = both(&dec, &e, &mask, &pass, positions);
                    let d = max_diff(&whole, &at);
                    assert!(
                        d < 1e-5,
                        "{name} fused={fused} right={right} {positions:?}: differs by {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn forward_at_trains_like_the_whole_pass() {
    for fused in [true, false] {
        let mut dec = tiny("tiny-llama");
        dec.set_fused(fused).unwrap();
        // Dropout high enough that a different mask would show.
        let lora = lora(&dec, 0.3);
        let (e, mask) = batch(&dec, false);
        let e = Var::from_tensor(&e).unwrap();
        let last = mask.last_positions();
        let run = |at: bool| {
            let ctx = collm_nn::TrainCtx::new(11);
            let pass = Pass {
                lora: Some(&lora),
                train: Some(&ctx),
                grad: true,
            };
            let logits = if at {
                let h = dec.forward_at(e.as_tensor(), &mask, &pass, &last).unwrap();
                dec.token_logits(&h, &[0, 0, 0], &[3, 4], &pass).unwrap()
            } else {
                let h = dec.forward(e.as_tensor(), &mask, &pass).unwrap();
                dec.token_logits(&h, &last, &[3, 4], &pass).unwrap()
            };
            let weights = Tensor::new(&[[1f32, -2.0], [0.5, 3.0], [-1.0, 1.5]], &DEV).unwrap();
            let grads = (&logits * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut g: Vec<Tensor> = lora
                .trainable()
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).expect("a LoRA gradient").clone())
                .collect();
            g.push(grads.get(e.as_tensor()).expect("an input gradient").clone());
            let pos = ChaCha8Rng::get_word_pos(&ctx.rng.borrow());
            (logits, g, pos)
        };
        let (whole, gw, pw) = run(false);
        let (at, ga, pa) = run(true);
        let d = max_diff(&whole, &at);
        assert!(d < 1e-5, "fused={fused}: logits differ by {d}");
        assert_eq!(pw, pa, "fused={fused}: the same number of dropout draws");
        for (k, (a, b)) in gw.iter().zip(&ga).enumerate() {
            let d = max_diff(a, b);
            let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1e-3);
            assert!(
                d < 1e-4 * scale.max(1.0),
                "fused={fused}: gradient {k} differs by {d}"
            );
        }
        // Another seed draws other masks: the comparison above is not vacuous.
        let ctx = collm_nn::TrainCtx::new(12);
        let pass = Pass {
            lora: Some(&lora),
            train: Some(&ctx),
            grad: true,
        };
        let h = dec.forward_at(e.as_tensor(), &mask, &pass, &last).unwrap();
        let other = dec.token_logits(&h, &[0, 0, 0], &[3, 4], &pass).unwrap();
        assert!(
            max_diff(&other, &at) > 1e-4,
            "fused={fused}: dropout has no effect"
        );
    }
}

#[test]
fn forward_at_refuses_positions_outside_the_rows() {
    let dec = tiny("tiny-llama");
    let (e, mask) = batch(&dec, false);
    let pass = Pass::inference();
    assert!(dec.forward_at(&e, &mask, &pass, &[6, 6]).is_err());
    assert!(dec.forward_at(&e, &mask, &pass, &[6, 7, 6]).is_err());
}
