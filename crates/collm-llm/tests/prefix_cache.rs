//! Shared-prefix scoring: prompt prefixes run once into a cache, then suffixes attend to it.
//! The logits at every suffix position equal the whole prompts' (left and right padding,
//! several prefixes in one batch, grouped-query heads, LoRA on every projection, fused and
//! composed paths); in a training pass the suffixes' gradients equal the whole prompts' too,
//! while the cache itself refuses to build a backward graph.

mod common;

use candle_core::{Device, Tensor, Var};
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use common::tiny;

fn lora(dec: &Decoder) -> Lora {
    let cfg = LoraConfig {
        target_modules: collm_llm::lora::MODULES.map(String::from).to_vec(),
        ..Default::default()
    };
    let lora = Lora::new(&cfg, &dec.config, 3, &Device::Cpu).unwrap();
    // B starts at zero; give it values so that every LoRA path carries signal.
    for (_, v) in lora.trainable() {
        let r = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
        v.set(&r).unwrap();
    }
    lora
}

/// Embeds `seqs` padded on the left or the right.
fn embed(dec: &Decoder, seqs: &[Vec<u32>], right: bool) -> (Tensor, Mask) {
    if !right {
        return dec.embed_left_padded(seqs, 0).unwrap();
    }
    let seq = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(0, seq - s.len()));
    }
    let e = dec
        .embed(&ids)
        .unwrap()
        .reshape((seqs.len(), seq, dec.hidden_size()))
        .unwrap();
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    (e, Mask::right_padded(&lens, seq))
}

/// Logits of tokens [3, 4, 9] at every real position of each row, row by row.
fn logits_per_position(dec: &Decoder, h: &Tensor, mask: &Mask, pass: &Pass) -> Vec<Vec<f32>> {
    (0..mask.batch)
        .map(|b| {
            let real: Vec<usize> = (0..mask.seq)
                .filter(|&t| mask.data[b * mask.seq + t] == 1)
                .collect();
            let rows = h.get(b).unwrap().unsqueeze(0).unwrap();
            real.iter()
                .flat_map(|&t| {
                    dec.token_logits(&rows, &[t], &[3, 4, 9], pass)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        })
        .collect()
}

/// Two prefixes (7 and 3 tokens) and five suffixes grouped by prefix, of different lengths:
/// (prefixes, (prefix, suffix) pairs, (prefix, row count) groups).
#[allow(clippy::type_complexity)]
fn batch() -> (Vec<Vec<u32>>, Vec<(usize, Vec<u32>)>, Vec<(usize, usize)>) {
    let prefixes = vec![vec![5u32, 6, 7, 8, 9, 10, 11], vec![12u32, 13, 14]];
    let suffixes = vec![
        (0, vec![20u32, 21, 22]),
        (0, vec![23u32]),
        (0, vec![24u32, 25, 26, 27, 28]),
        (1, vec![29u32, 30]),
        (1, vec![31u32, 32, 33, 34]),
    ];
    (prefixes, suffixes, vec![(0, 3), (1, 2)])
}

#[test]
fn suffixes_over_a_cached_prefix_equal_whole_prompts() {
    let (prefixes, suffixes, groups) = batch();
    for name in ["tiny-llama", "tiny-qwen2"] {
        for fused in [true, false] {
            for right in [false, true] {
                let mut dec = tiny(name);
                dec.set_fused(fused).unwrap();
                let lora = lora(&dec);
                let pass = Pass {
                    lora: Some(&lora),
                    train: None,
                    grad: false,
                };
                // Whole prompts.
                let whole: Vec<Vec<u32>> = suffixes
                    .iter()
                    .map(|(p, s)| [prefixes[*p].clone(), s.clone()].concat())
                    .collect();
                let (e, m) = embed(&dec, &whole, right);
                let h = dec.forward(&e, &m, &pass).unwrap();
                let full = logits_per_position(&dec, &h, &m, &pass);
                // Prefixes once, then the suffixes.
                let (pe, pm) = embed(&dec, &prefixes, right);
                let cache = dec.prefill(&pe, &pm, &pass).unwrap();
                assert_eq!(cache.len(), 2);
                assert_eq!(cache.prefix_len(0), Some(7));
                let sfx: Vec<Vec<u32>> = suffixes.iter().map(|(_, s)| s.clone()).collect();
                let (se, sm) = embed(&dec, &sfx, right);
                let hs = dec
                    .forward_cached(&se, &sm, &cache, &groups, &pass)
                    .unwrap();
                let part = logits_per_position(&dec, &hs, &sm, &pass);
                for (r, ((p, s), got)) in suffixes.iter().zip(&part).enumerate() {
                    let skip = prefixes[*p].len() * 3;
                    let want = &full[r][skip..];
                    assert_eq!(got.len(), s.len() * 3);
                    let diff = want
                        .iter()
                        .zip(got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-4,
                        "{name} fused={fused} right={right} row {r}: max diff {diff}"
                    );
                }
            }
        }
    }
}

/// The gradient of a fixed probe of the " 3, 4, 9" logits at each row's last position with
/// respect to the input embeddings, as (row, position) vectors at each row's real positions.
fn probe_grads(
    dec: &Decoder,
    e: &Tensor,
    m: &Mask,
    run: &dyn Fn(&Tensor) -> Tensor,
) -> Vec<Vec<Vec<f32>>> {
    let var = Var::from_tensor(e).unwrap();
    let h = run(var.as_tensor());
    let pass = Pass {
        lora: None,
        train: None,
        grad: true,
    };
    let logits = dec
        .token_logits(&h, &m.last_positions(), &[3, 4, 9], &pass)
        .unwrap();
    let n = logits.elem_count();
    let r: Vec<f32> = (0..n).map(|k| ((k * 37 % 11) as f32 - 5.0) / 5.0).collect();
    let r = Tensor::from_vec(r, logits.dims(), &Device::Cpu).unwrap();
    let g = logits
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g.get(var.as_tensor()).expect("a gradient").clone();
    (0..m.batch)
        .map(|b| {
            (0..m.seq)
                .filter(|&t| m.data[b * m.seq + t] == 1)
                .map(|t| g.get(b).unwrap().get(t).unwrap().to_vec1::<f32>().unwrap())
                .collect()
        })
        .collect()
}

/// Step 2 of CoLLM trains only what enters after the first ID slot, so a training pass may run
/// the text before it as a cached prefix: the gradients reaching the suffixes' embeddings equal
/// those of the whole prompts (LoRA frozen, fused and composed paths, left and right padding,
/// several prefixes per batch, grouped-query heads). A suffix that leaked into its prefix (or
/// a prefix that saw its suffix) would change them.
#[test]
fn suffix_gradients_over_a_cached_prefix_equal_whole_prompts() {
    let (prefixes, suffixes, groups) = batch();
    for name in ["tiny-llama", "tiny-qwen2"] {
        for fused in [true, false] {
            for right in [false, true] {
                let mut dec = tiny(name);
                dec.set_fused(fused).unwrap();
                let mut lora = lora(&dec);
                lora.freeze();
                let pass = Pass {
                    lora: Some(&lora),
                    train: None,
                    grad: true,
                };
                let whole: Vec<Vec<u32>> = suffixes
                    .iter()
                    .map(|(p, s)| [prefixes[*p].clone(), s.clone()].concat())
                    .collect();
                let (e, m) = embed(&dec, &whole, right);
                let full = probe_grads(&dec, &e, &m, &|x| dec.forward(x, &m, &pass).unwrap());
                let (pe, pm) = embed(&dec, &prefixes, right);
                let cache = dec
                    .prefill(
                        &pe,
                        &pm,
                        &Pass {
                            grad: false,
                            ..pass
                        },
                    )
                    .unwrap();
                let sfx: Vec<Vec<u32>> = suffixes.iter().map(|(_, s)| s.clone()).collect();
                let (se, sm) = embed(&dec, &sfx, right);
                let part = probe_grads(&dec, &se, &sm, &|x| {
                    dec.forward_cached(x, &sm, &cache, &groups, &pass).unwrap()
                });
                let mut largest = 0f32;
                for (r, (p, s)) in suffixes.iter().enumerate() {
                    let want = &full[r][prefixes[*p].len()..];
                    assert_eq!(part[r].len(), s.len());
                    for (a, b) in want.iter().zip(&part[r]) {
                        for (x, y) in a.iter().zip(b) {
                            largest = largest.max(x.abs());
                            let d = (x - y).abs();
                            assert!(
                                d < 1e-5,
                                "{name} fused={fused} right={right} row {r}: gradient differs by {d}"
                            );
                        }
                    }
                }
                assert!(largest > 1e-3, "{name}: the gradients are all zero");
            }
        }
    }
}

#[test]
fn the_cache_holds_constants_and_its_suffix_pass_draws_no_dropout() {
    let dec = tiny("tiny-llama");
    let (e, m) = dec.embed_left_padded(&[vec![5, 6, 7]], 0).unwrap();
    let pass = Pass {
        lora: None,
        train: None,
        grad: true,
    };
    let err = dec.prefill(&e, &m, &pass).err().unwrap();
    assert!(format!("{err:#}").contains("holds constants"), "{err:#}");
    let cache = dec.prefill(&e, &m, &Pass::inference()).unwrap();
    let ctx = collm_nn::TrainCtx::new(1);
    let train = Pass {
        lora: None,
        train: Some(&ctx),
        grad: true,
    };
    let err = dec
        .forward_cached(&e, &m, &cache, &[(0, 1)], &train)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("without dropout"), "{err:#}");
    let err = dec
        .forward_cached(&e, &m, &cache, &[(1, 1)], &Pass::inference())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("no cached prefix 1"), "{err:#}");
    let err = dec
        .forward_cached(&e, &m, &cache, &[(0, 2)], &Pass::inference())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("cover 2 rows"), "{err:#}");
}
