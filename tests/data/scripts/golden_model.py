"""Tiny random Qwen2/Qwen3/Llama/Mistral/Gemma checkpoints and their reference outputs from `transformers`.

Run from the repository root with a Python that has torch and transformers (produced with
torch 2.15.0, transformers 5.23.0, on CPU):

    python tests/data/scripts/golden_model.py [NAME ...]

For each model NAME below it writes
- tests/data/models/NAME/: `save_pretrained` output (config.json, generation_config.json,
  model.safetensors in float32);
- tests/data/models/NAME.golden.json: a right-padded batch (input_ids, attention_mask), the
  float32 logits at every position, `targets` aligned with the logits (-100 = ignored), the
  masked mean cross-entropy sum(-log p(target)) / count, the gradient of that loss as global
  and per-parameter L2 norms, and greedy continuations of a prompt (`generate`, no sampling), plain and with
  a repetition penalty.

Weights are drawn with fixed seeds. Biases and norm gains are randomised too (transformers
initialises them to 0 and 1, which would hide a wrong bias or gain). Attention is "eager".
"""
import json
import pathlib
import sys

import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = pathlib.Path(__file__).resolve().parents[3]
OUT = ROOT / "tests/data/models"

COMMON = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)

MODELS = {
    # Qwen2.5-style: tied head, q/k/v biases, rope_theta 1e6.
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3: q/k RMSNorm per head, head_dim 16 != hidden / heads, no bias, tied; eos a list.
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config(**{**COMMON, "eos_token_id": [2, 3]}, head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    ),
    # Llama with attention_bias: biases on q/k/v and o_proj.
    "llama-bias": (
        LlamaForCausalLM,
        LlamaConfig(**COMMON, attention_bias=True, tie_word_embeddings=False, rope_theta=5e5),
    ),
    # Llama 3.x: llama3 rope scaling (an original context of 16 positions, so the batch's 12
    # reach the ramp and the low frequencies are divided by the factor), head_dim 16 given
    # explicitly (hidden / heads is 8), MLP biases, tied head.
    "llama3": (
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            head_dim=16,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # Mistral: a sliding window of 4 positions, shorter than the batch's 12 and than the prompt
    # plus its greedy continuation (so generation with the KV cache must mask old keys too).
    "mistral": (
        MistralForCausalLM,
        MistralConfig(**COMMON, sliding_window=4, tie_word_embeddings=False, rope_theta=1e6),
    ),
    # Gemma 2: layers alternate sliding (window 4) and full attention; scores scaled by
    # query_pre_attn_scalar 12 (not head_dim 16); soft-caps low enough to bend the attention
    # scores and the logits of these random weights; tied head.
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config(
            **COMMON,
            head_dim=16,
            query_pre_attn_scalar=12,
            sliding_window=4,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        ),
    ),
    # Gemma 3: q/k norms, two sliding layers (window 4, RoPE base 1e4) then a full one (base
    # 1e6, linear scaling 2), untied head.
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=False,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}

# Row 0 is full; row 1 has 7 real tokens, right-padded with id 0.
INPUT_IDS = [
    [1, 17, 200, 45, 3, 99, 128, 255, 64, 5, 77, 31],
    [1, 250, 8, 8, 8, 140, 60, 0, 0, 0, 0, 0],
]
ATTENTION_MASK = [[1] * 12, [1] * 7 + [0] * 5]
# targets[b][i] is the token logits[b][i] should predict: the next input id, -100 where ignored
# (padding, the last real position, and a couple of positions excluded on purpose).
TARGETS = [
    [17, -100, 45, 3, 99, 128, 255, 64, 5, -100, 31, -100],
    [250, 8, 8, 8, 140, 60, -100, -100, -100, -100, -100, -100],
]
PROMPT = [1, 42, 7, 199, 13]
NEW_TOKENS = 10


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def greedy(model, repetition_penalty=1.0):
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        eos_token_id=None,
        pad_token_id=0,
    )
    new = out[0, len(PROMPT) :].tolist()
    # Every step must have a clear winner, or float noise could flip the reference.
    full = torch.tensor([PROMPT + new])
    with torch.no_grad():
        logits = model(full).logits[0, len(PROMPT) - 1 : -1]
    for step in range(len(new)):
        for tok in set(PROMPT + new[:step]):
            x = logits[step, tok]
            logits[step, tok] = x * repetition_penalty if x < 0 else x / repetition_penalty
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 1e-3, f"greedy margin {margin} too small; pick another PROMPT"
    return new


def main():
    # `golden_model.py NAME ...` writes only those models (each keeps its seed, from its place in
    # MODELS), so adding a model does not rewrite the others' files.
    only = set(sys.argv[1:])
    torch.manual_seed(0)
    for seed, (name, (cls, config)) in enumerate(MODELS.items()):
        if only and name not in only:
            continue
        config._attn_implementation = "eager"
        model = cls(config).float()
        randomise(model, 1000 + seed)
        model.eval()
        model.save_pretrained(OUT / name, safe_serialization=True)

        ids = torch.tensor(INPUT_IDS)
        mask = torch.tensor(ATTENTION_MASK)
        targets = torch.tensor(TARGETS)
        logits = model(input_ids=ids, attention_mask=mask).logits
        vocab = logits.shape[-1]
        loss_sum = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        count = (targets != -100).sum()
        loss = loss_sum / count
        model.zero_grad()
        loss.backward()
        grad_norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        global_norm = sum(v * v for v in grad_norms.values()) ** 0.5

        golden = {
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "input_ids": INPUT_IDS,
            "attention_mask": ATTENTION_MASK,
            "targets": TARGETS,
            # Six decimals: far below the 1e-4 tolerance, and a third of the file size.
            "logits": [[[round(x, 6) for x in row] for row in b] for b in logits.detach().tolist()],
            "loss": loss.item(),
            "grad_norm": global_norm,
            "param_grad_norms": grad_norms,
            "prompt": PROMPT,
            "greedy": greedy(model),
            # transformers' RepetitionPenaltyLogitsProcessor semantics, greedy.
            "repetition_penalty": 1.3,
            "greedy_penalized": greedy(model, 1.3),
        }
        path = OUT / f"{name}.golden.json"
        path.write_text(json.dumps(golden) + "\n")
        print(f"{name}: loss {loss.item():.6f}, grad norm {global_norm:.6f}, "
              f"|logits| max {logits.abs().max().item():.3f}, greedy {golden['greedy']}, "
              f"penalized {golden['greedy_penalized']}")


if __name__ == "__main__":
    main()
