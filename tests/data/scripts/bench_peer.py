"""The PyTorch peer of `sft bench train`, run by `cargo xtask bench --peer`.

    python bench_peer.py --config {a,b,c,d} --threads N --steps S --warmup W [--batch-size B] [--seq-len L]

prints one JSON line with the keys `sft bench train --json` prints (tokens_per_s, step_s_median,
peak_rss_mib, forward_s, backward_s, optimizer_s, params, batch_size, seq_len, threads) plus
"config". A full step is what ours is: forward with the causal-LM loss (mean cross-entropy over
the shifted targets, every position a target), backward, global-norm clipping to 1.0, AdamW
(lr 1e-5, weight decay 0.1), zero_grad. f32 on the CPU, random ids, seed 0.

Environment: torch and transformers from PyPI, e.g.
    python3 -m venv target/bench-venv && target/bench-venv/bin/pip install torch transformers
(`cargo xtask bench --peer` creates that environment itself when it is missing).
"""

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

QWEN_SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
# (model, vocab, default batch, default seq)
CONFIGS = {
    "a": ("qwen2", dict(QWEN_SMALL, vocab_size=151936), 8, 256),
    "b": ("qwen2", dict(QWEN_SMALL, vocab_size=4096), 8, 256),
    "c": ("gpt", dict(vocab_size=6000, n_embd=256, n_layer=8, n_head=8, block_size=256,
                      dropout=0.1, bias=True), 16, 256),
    "d": ("qwen2", dict(QWEN_05B, vocab_size=151936), 1, 256),
}


class Block(nn.Module):
    """nanoGPT's block, as sft-model's GPT: pre-LayerNorm, fused qkv, tanh GELU, dropout."""

    def __init__(self, c):
        super().__init__()
        e, self.h, self.p = c["n_embd"], c["n_head"], c["dropout"]
        self.ln_1 = nn.LayerNorm(e, bias=c["bias"])
        self.c_attn = nn.Linear(e, 3 * e, bias=c["bias"])
        self.attn_proj = nn.Linear(e, e, bias=c["bias"])
        self.ln_2 = nn.LayerNorm(e, bias=c["bias"])
        self.c_fc = nn.Linear(e, 4 * e, bias=c["bias"])
        self.mlp_proj = nn.Linear(4 * e, e, bias=c["bias"])
        self.drop = nn.Dropout(self.p)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(e, dim=2)
        q, k, v = (z.view(b, t, self.h, e // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(b, t, e)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class Gpt(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.wpe = nn.Embedding(c["block_size"], c["n_embd"])
        self.drop = nn.Dropout(c["dropout"])
        self.h = nn.ModuleList(Block(c) for _ in range(c["n_layer"]))
        self.ln_f = nn.LayerNorm(c["n_embd"], bias=c["bias"])

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        x = self.drop(self.wte(ids) + self.wpe(pos))
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head


def build(kind, cfg):
    if kind == "gpt":
        return Gpt(cfg)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # sdpa attention, the transformers default on CPU.
    return Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="sdpa"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    a = ap.parse_args()
    kind, cfg, batch, seq = CONFIGS[a.config]
    batch, seq = a.batch_size or batch, a.seq_len or seq
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    model = build(kind, cfg).float().train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    print(f"config {a.config}: {n_params} parameters", file=sys.stderr)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-5)
    vocab = cfg["vocab_size"]
    fwd, bwd, optim, total = [], [], [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, vocab, (batch, seq))
        t0 = time.perf_counter()
        out = model(ids)
        logits = out if kind == "gpt" else out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if not math.isfinite(loss.item()):
            sys.exit(f"non-finite loss at step {step}")
        if step >= a.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            optim.append(t3 - t2)
            total.append(t3 - t0)

    def median(v):
        return sorted(v)[len(v) // 2]

    step_s = median(total)
    print(json.dumps({
        "tokens_per_s": batch * seq / step_s,
        "step_s_median": step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "forward_s": median(fwd),
        "backward_s": median(bwd),
        "optimizer_s": median(optim),
        "params": n_params,
        "batch_size": batch,
        "seq_len": seq,
        "threads": a.threads,
        "config": a.config,
    }))


if __name__ == "__main__":
    main()
