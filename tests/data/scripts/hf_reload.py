"""Loads a checkpoint that `sft` exported with `transformers`, unchanged, and checks that it works.

    python hf_reload.py --model runs/qwen-layout/final --data runs/data/instructions-test.jsonl \
        [--n 20] [--max-new-tokens 64]

For the first N chats of the data file: drops the last assistant turn, renders the rest with the
checkpoint's own chat template (`apply_chat_template(..., add_generation_prompt=True)`), decodes
greedily with `generate`, and records whether generation stopped at the template's end-of-turn
token (the tokenizer's eos) and whether the answer equals the dropped turn. Also computes the mean
cross-entropy of the dropped turn's tokens, through its end-of-turn token, given everything
before them (teacher forcing): a sanity check of the weights, not `sft eval`'s number, which
averages over every assistant turn.

Prints one line of JSON on stdout: the model class `transformers` chose, n, the stop rate, the
exact-match rate, the mean loss over answer tokens, and the first three generations as text.
Anything else goes to stderr. Needs torch and transformers (`target/bench-venv` from
`cargo xtask bench --peer` has both).
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    eos = tok.eos_token_id
    chats = []
    with open(args.data, encoding="utf-8") as f:
        for line in f:
            chats.append(json.loads(line)["messages"])
            if len(chats) == args.n:
                break

    stopped = exact = 0
    loss_sum, loss_tokens = 0.0, 0
    samples = []
    for messages in chats:
        prompt_messages, answer = messages[:-1], messages[-1]["content"]
        prompt = tok.apply_chat_template(
            prompt_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        new = out[0, prompt.shape[1]:].tolist()
        did_stop = eos in new
        stopped += did_stop
        text = tok.decode(new[: new.index(eos)] if did_stop else new)
        # The Qwen3 template writes an empty think block before an answer; compare what follows.
        exact += did_stop and text.split("</think>")[-1].strip() == answer.strip()
        if len(samples) < 3:
            samples.append(tok.decode(new))

        # Teacher-forced loss of the answer's tokens: the full chat rendered by the template,
        # scored from where the generation prompt ends.
        full = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
        start = prompt.shape[1]
        if full.shape[1] > start and torch.equal(full[0, :start], prompt[0]):
            with torch.no_grad():
                logits = model(full).logits[0, :-1]
            targets = full[0, 1:]
            rest = full[0, start:].tolist()
            end = start + (rest.index(eos) + 1 if eos in rest else len(rest))
            ce = torch.nn.functional.cross_entropy(
                logits[start - 1 : end - 1], targets[start - 1 : end - 1], reduction="sum"
            )
            loss_sum += ce.item()
            loss_tokens += end - start
        else:
            print("prompt is not a prefix of the rendered chat; loss skipped", file=sys.stderr)

    n = len(chats)
    print(
        json.dumps(
            {
                "class": type(model).__name__,
                "n": n,
                "stop_rate": stopped / n,
                "exact_match": exact / n,
                "answer_loss": loss_sum / max(loss_tokens, 1),
                "answer_tokens": loss_tokens,
                "samples": samples,
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
