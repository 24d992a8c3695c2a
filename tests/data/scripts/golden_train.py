"""Reference training trajectory for the trainer's parity test, produced with PyTorch + transformers.

Run from the repository root (tested with torch 2.15.0, transformers 5.23.0, CPU, float32):

    /work/pyref/venv/bin/python tests/data/scripts/golden_train.py

Model: tests/data/models/qwen2-untied (separate lm_head, q/k/v biases). Three optimizer steps,
each of two micro-batches of two right-padded rows. Loss = sum over target tokens of
-log p(target) / number of target tokens in the whole optimizer step (both micro-batches), the
token-level normalisation TRL and torchtune use. AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
weight_decay=0.1 on parameters with >= 2 dims, 0 on the rest), gradients clipped to global norm
1.0 (torch.nn.utils.clip_grad_norm_). Constant learning rate.

Writes tests/data/golden/train_trajectory.json: the samples (ids + loss_mask, unshifted), the
batch layout, per-step loss and pre-clip gradient norm, and the final parameters' sums and L2
norms per tensor.
"""
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = ROOT / "tests/data/models/qwen2-untied"
OUT = ROOT / "tests/data/golden/train_trajectory.json"


def make_samples(n, vocab, gen):
    samples = []
    for _ in range(n):
        length = int(torch.randint(5, 21, (1,), generator=gen))
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        # A prompt of random length, then targets to the end (like a completion).
        start = int(torch.randint(1, length - 1, (1,), generator=gen))
        mask = [0] * start + [1] * (length - start)
        samples.append({"ids": ids, "loss_mask": mask})
    return samples


def batch(rows):
    t = max(len(r["ids"]) for r in rows)
    ids = torch.zeros((len(rows), t), dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        attn[i, :n] = 1
        for j in range(n - 1):
            if r["loss_mask"][j + 1]:
                labels[i, j] = r["ids"][j + 1]
    return ids, attn, labels


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32, attn_implementation="eager")
    model.train()
    vocab = model.config.vocab_size
    samples = make_samples(12, vocab, gen)
    steps = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False,
    )
    losses, norms = [], []
    for step in steps:
        batches = [batch([samples[i] for i in mb]) for mb in step]
        n_targets = sum(int((lab != -100).sum()) for _, _, lab in batches)
        opt.zero_grad()
        total = 0.0
        for ids, attn, labels in batches:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            loss_sum = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            (loss_sum / n_targets).backward()
            total += float(loss_sum.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(total / n_targets)
        norms.append(float(norm))
    final = {
        n: {"sum": float(p.detach().double().sum()), "norm": float(p.detach().double().norm())}
        for n, p in model.named_parameters()
    }
    OUT.write_text(json.dumps({
        "model": "tests/data/models/qwen2-untied",
        "samples": samples,
        "steps": steps,
        "lr": 1e-3, "weight_decay": 0.1, "max_grad_norm": 1.0,
        "losses": losses,
        "grad_norms": norms,
        "final_params": final,
    }, indent=1))
    print("losses", losses, "grad norms", norms)


if __name__ == "__main__":
    main()
