#!/usr/bin/env python3
"""Makes the LLM conformance fixtures: tiny random LLaMA and Qwen2 checkpoints written with
Hugging Face transformers, the logits transformers computes for them, and a PEFT LoRA adapter
with the logits it gives. collm's decoder must reproduce these logits within 1e-4 (f32), with
and without padding (crates/collm-llm/tests/conformance.rs).

Usage: python3 scripts/make_llm_fixtures.py [OUT_DIR]   (needs torch, transformers, peft)
The files are small and committed; rerun only to change the fixtures.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/collm-llm/tests/fixtures")
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, rms_norm_eps=1e-5)
SEQS = [[5, 17, 33, 2, 90, 41, 7, 64, 12], [8, 3, 77], [50, 51, 52, 53, 54, 55]]


def record(model, seqs):
    """Logits at every position of each sequence, run alone (no padding)."""
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0]
            out.append(logits.tolist())
    return out


def make(name, model):
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d


def main():
    torch.manual_seed(0)
    fixtures = {"sequences": SEQS}
    llama = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=10000.0,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}))
    llama.eval()
    # Random norms: the defaults (ones) would hide a missing scale.
    with torch.no_grad():
        for n, p in llama.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    make("tiny-llama", llama)
    fixtures["tiny-llama"] = record(llama, SEQS)

    qwen = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1000000.0))
    qwen.eval()
    with torch.no_grad():
        for n, p in qwen.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            if n.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    make("tiny-qwen2", qwen)
    fixtures["tiny-qwen2"] = record(qwen, SEQS)

    from peft import LoraConfig, get_peft_model
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "down_proj"], bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(llama, lcfg)
    peft_model.eval()
    peft_model.save_pretrained(OUT / "tiny-llama-lora")
    fixtures["tiny-llama-lora"] = record(peft_model, SEQS)
    import transformers, peft
    fixtures["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}
    (OUT / "logits.json").write_text(json.dumps(fixtures))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
