"""Greedy continuations by transformers of prompts given as token ids, the model read from a GGUF
file (`from_pretrained(dir, gguf_file=...)`, which dequantizes every tensor to float32).

    python hf_gguf_greedy.py < request.json > answers.json

request: {"gguf": PATH, "prompts": [[id, ...], ...], "max_new_tokens": N, "stop_ids": [id, ...]}
answers: {"transformers": VERSION, "answers": [{"ids": [...], "margins": [...]}, ...]}: the new
ids up to (not including) a stop id, and at each step the gap between the best and the second
best logit (a small gap is a near-tie that float noise may flip). Run by `cargo xtask
real-model`.
"""
import json
import pathlib
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    req = json.load(sys.stdin)
    path = pathlib.Path(req["gguf"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    stop = set(req["stop_ids"])
    answers = []
    for prompt in req["prompts"]:
        ids, margins = list(prompt), []
        past = None
        step_input = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(req["max_new_tokens"]):
                out = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1]
                top2 = logits.topk(2)
                margins.append(round((top2.values[0] - top2.values[1]).item(), 4))
                nxt = int(top2.indices[0])
                if nxt in stop:
                    break
                ids.append(nxt)
                step_input = torch.tensor([[nxt]])
        answers.append({"ids": ids[len(prompt):], "margins": margins})
    json.dump({"transformers": transformers.__version__, "answers": answers}, sys.stdout)


if __name__ == "__main__":
    main()
