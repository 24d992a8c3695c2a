"""The PyTorch peer of `sft bench train`, run by `cargo xtask bench --peer`.

    python bench_peer.py --config {a,b,c,d} --threads N --steps S --warmup W \
        [--batch-size B] [--seq-len L] [--dropout P] [--device cpu|cuda] [--dtype f32|bf16] \
        [--lora [--lora-r R] [--lora-alpha A] [--lora-dropout P]]

prints exactly one line of JSON on stdout, with the keys `sft bench train --json` prints
(tokens_per_s, step_s_median, peak_rss_mib, forward_s, backward_s, optimizer_s, params,
batch_size, seq_len, threads, device, dtype, lora, trainable_params) plus "config" and
"peak_device_mib" (CUDA's peak allocation, null on the CPU); anything else goes to stderr. Times are medians over
the timed steps (the upper median for an even count, as ours); tokens_per_s = batch * seq_len /
step_s_median; peak_rss_mib is getrusage(RUSAGE_SELF).ru_maxrss / 1024.

A full step: forward with the causal-LM loss (the mean cross-entropy of logits[:, :-1] against
ids[:, 1:], every position a target, computed as `transformers`' ForCausalLMLoss does), backward,
clip_grad_norm_(1.0), AdamW(lr=1e-5, weight_decay=0.1) step, zero_grad(set_to_none=True). f32 on
the CPU unless --device/--dtype say otherwise (on CUDA each phase ends with a synchronize), random ids uniform in [0, vocab), torch.manual_seed(0), torch.set_num_threads(N),
torch.set_num_interop_threads(1). "forward_s" includes the loss, as ours does.

Configurations (default batch x seq):
  a  transformers Qwen2ForCausalLM, h256 i768 4L 4H/2KV, vocab 151,936, tied          8x256
  b  the same with vocab 4,096                                                      8x256
  c  nanoGPT (Karpathy's model.py) char model, vocab 6,000, 256/8L/8H, block 256,
     bias, dropout 0.1 in train mode, tied head: the architecture of sft-model's GPT 16x256
  d  Qwen2.5-0.5B shape (h896 i4864 24L 14H/2KV, vocab 151,936, tied); one step     1x256
     (steps 1, warmup 0 unless given)

--lora (Qwen2 configurations): PEFT's `get_peft_model` with LoraConfig(r, lora_alpha,
lora_dropout, target_modules="all-linear") (defaults 16, 32, 0.05: `sft bench train --lora`'s), the
base frozen; AdamW and clipping over the trainable parameters only. "params" stays the model's
total; "trainable_params" counts the adapters.

Environment: torch, transformers and (for --lora) peft from PyPI, e.g.
    python3 -m venv target/bench-venv && target/bench-venv/bin/pip install torch transformers peft
(`cargo xtask bench --peer` creates that environment itself when it is missing). Written against
torch 2.x and transformers 5.x (checked with torch 2.15 and transformers 5.23; --lora with
transformers 5.25 and peft 0.21.2).
"""

import argparse
import contextlib
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
NANOPOET = dict(vocab_size=6000, n_embd=256, n_layer=8, n_head=8, block_size=256, dropout=0.1,
                bias=True)
# name: (model kind, config, default batch, default seq, default (steps, warmup) or None)
CONFIGS = {
    "a": ("qwen2", dict(QWEN_SMALL, vocab_size=151936), 8, 256, None),
    "b": ("qwen2", dict(QWEN_SMALL, vocab_size=4096), 8, 256, None),
    "c": ("gpt", NANOPOET, 16, 256, None),
    "d": ("qwen2", dict(QWEN_05B, vocab_size=151936), 1, 256, (1, 0)),
}
IGNORE_INDEX = -100


def causal_lm_loss(logits, ids):
    """transformers' ForCausalLMLoss with labels = ids: pad the labels by one ignored position and
    shift them left (no copy of the logits), mean cross-entropy over the B * (T - 1) targets."""
    labels = F.pad(ids, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")


class Block(nn.Module):
    """nanoGPT's Block (CausalSelfAttention + MLP) as sft-model's GPT has it: pre-LayerNorm with
    bias, fused qkv projection, SDPA causal attention with dropout on the attention
    probabilities, residual dropout after each output projection, 4x MLP with the tanh-approximate
    GELU (model/src/kernels.rs `gelu`; nanoGPT's nn.GELU() is the erf form)."""

    def __init__(self, c):
        super().__init__()
        e, bias = c["n_embd"], c["bias"]
        self.n_head, self.p = c["n_head"], c["dropout"]
        self.ln_1 = nn.LayerNorm(e, bias=bias)  # eps 1e-5, as ours
        self.c_attn = nn.Linear(e, 3 * e, bias=bias)
        self.attn_proj = nn.Linear(e, e, bias=bias)
        self.ln_2 = nn.LayerNorm(e, bias=bias)
        self.c_fc = nn.Linear(e, 4 * e, bias=bias)
        self.mlp_proj = nn.Linear(4 * e, e, bias=bias)
        self.attn_drop = nn.Dropout(self.p)
        self.mlp_drop = nn.Dropout(self.p)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                           dropout_p=self.p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, e)
        x = x + self.attn_drop(self.attn_proj(y))
        return x + self.mlp_drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class Gpt(nn.Module):
    """nanoGPT's GPT: token + learned position embeddings, embedding dropout, blocks, final
    LayerNorm, lm_head tied to the token embedding (logits at every position)."""

    def __init__(self, c):
        super().__init__()
        self.block_size = c["block_size"]
        self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.wpe = nn.Embedding(c["block_size"], c["n_embd"])
        self.drop = nn.Dropout(c["dropout"])
        self.h = nn.ModuleList(Block(c) for _ in range(c["n_layer"]))
        self.ln_f = nn.LayerNorm(c["n_embd"], bias=c["bias"])
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one parameter
        # nanoGPT's initialisation (irrelevant to speed; keeps the loss near ln(vocab)).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c["n_layer"]) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        t = ids.shape[1]
        assert t <= self.block_size, f"sequence length {t} > block size {self.block_size}"
        pos = torch.arange(t, dtype=torch.long, device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def build(kind, cfg):
    if kind == "gpt":
        return Gpt(cfg)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # attn_implementation="sdpa" is transformers' default where torch has SDPA (CPU included);
    # named here so that the peer does not change with the default. transformers 5 stores
    # rope_theta under rope_parameters; the flat keyword is still read. The model is built in
    # torch's default dtype, f32 (no `dtype`/`torch_dtype` needed).
    config = Qwen2Config(**cfg, attn_implementation="sdpa", use_cache=False)
    return Qwen2ForCausalLM(config)


def median(v):
    return sorted(v)[len(v) // 2]  # the upper median for an even count, as sft's bench


def run(a):
    kind, cfg, batch, seq, steps_warmup = CONFIGS[a.config]
    batch, seq = a.batch_size or batch, a.seq_len or seq
    steps, warmup = steps_warmup or (3, 1)
    steps = a.steps if a.steps is not None else steps
    warmup = a.warmup if a.warmup is not None else warmup
    if steps < 1 or warmup < 0 or batch < 1 or seq < 2:
        sys.exit("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --seq-len >= 2")
    if kind == "gpt":
        if a.dropout is not None:
            cfg = dict(cfg, dropout=a.dropout)
        if seq > cfg["block_size"]:
            sys.exit(f"--seq-len {seq} exceeds the block size {cfg['block_size']}")
    elif a.dropout is not None:
        sys.exit("--dropout applies to config c only")
    if a.lora and kind == "gpt":
        sys.exit("--lora applies to the Qwen2 configurations (a, b, d)")

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = build(kind, cfg).to(device=dev, dtype=dtype).train()
    n_total = sum(p.numel() for p in model.parameters())
    if a.lora:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora).train()

    def sync():
        # CUDA queues kernels and returns: a phase ends when the device has done its work.
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    params = [p for p in model.parameters() if p.requires_grad]  # tied weights counted once
    n_params = sum(p.numel() for p in params)  # trainable
    print(f"bench_peer: config {a.config}: {n_total:,} parameters ({n_params:,} trainable), "
          f"batch {batch} x seq {seq}, "
          f"{a.threads} threads, {a.dtype} on {a.device}, torch {torch.__version__}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    vocab = cfg["vocab_size"]
    fwd, bwd, optim, total = [], [], [], []
    for step in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq), device=dev)
        sync()
        t0 = time.perf_counter()
        if kind == "gpt":
            loss = causal_lm_loss(model(ids), ids)
        else:
            # labels=ids: transformers' own ForCausalLMLoss (shift by padding the labels).
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        value = loss.item()
        del loss
        if not math.isfinite(value):
            sys.exit(f"non-finite loss at step {step}")
        print(f"bench_peer: step {step}{' (warm-up)' if step < warmup else ''}: loss {value:.4f}, "
              f"{t3 - t0:.3f} s", file=sys.stderr)
        if step >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            optim.append(t3 - t2)
            total.append(t3 - t0)

    step_s = median(total)
    return {
        "tokens_per_s": batch * seq / step_s,
        "step_s_median": step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "forward_s": median(fwd),
        "backward_s": median(bwd),
        "optimizer_s": median(optim),
        "params": n_total,
        "trainable_params": n_params,
        "lora": a.lora,
        "batch_size": batch,
        "seq_len": seq,
        "threads": a.threads,
        "config": a.config,
        "device": a.device,
        "dtype": a.dtype,
        # The GPU's own peak allocation (host RSS above does not see it).
        "peak_device_mib": (torch.cuda.max_memory_allocated(dev) / 2**20
                            if dev.type == "cuda" else None),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--steps", type=int, help="timed steps (default 3; d: 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 1; d: 0)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--dropout", type=float,
                    help="config c only: dropout probability (default 0.1, nanopoet's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                    help="weights and activations (bf16: the GPU benchmark's)")
    ap.add_argument("--lora", action="store_true",
                    help="PEFT LoRA on every linear layer (Qwen2 configurations)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    a = ap.parse_args()
    out = sys.stdout
    # Whatever a library prints goes to stderr: stdout carries the one JSON line only.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(a)
    out.write(json.dumps(result) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
