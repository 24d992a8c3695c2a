"""Golden chat renderings and assistant masks for the Llama 3, Gemma and Mistral chat formats.

Run from the repository root with a Python that has `transformers` (produced with 5.25.0):

    python tests/data/scripts/golden_family_chat.py

The templates are tests/data/templates/{llama3,gemma,mistral}.jinja: written for this project in
each family's format (Llama 3's header tokens and `<|eot_id|>`; Gemma's `<start_of_turn>` /
`<end_of_turn>`, role `model`, no system role (a system message opens the first user turn);
Mistral's `[INST]` ... `[/INST]`, answers closed by `</s>`, no generation prompt). None has
`{% generation %}` markers, as the checkpoints' own templates have none: `sft` must find the
assistant spans by probing. The masks here come from copies with the markers added (the script
checks that they render the same text).

The tokenizer is the Qwen tokenizer fixture (tests/data/qwen3-tokenizer) with each family's
special tokens added (in the order listed; a string the vocabulary already has keeps its id) and
its bos/eos tokens set; the Rust test builds the same tokenizer from the `tokenizer` field of
each row.

Writes tests/data/golden/family_chat_templates.jsonl, one object per (template, case), with the
fields of chat_templates.jsonl (see golden_data.py) plus `tokenizer`: {"added", "bos_token",
"eos_token"}.
"""
import json
import pathlib

from transformers import AddedToken, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests/data/qwen3-tokenizer"
TEMPLATES = ROOT / "tests/data/templates"
OUT = ROOT / "tests/data/golden/family_chat_templates.jsonl"


def tagged(template, old, new):
    """`template` with one assistant expression wrapped in generation markers."""
    assert template.count(old) == 1, old
    return template.replace(old, new)


LLAMA3 = (TEMPLATES / "llama3.jinja").read_text()
GEMMA = (TEMPLATES / "gemma.jinja").read_text()
MISTRAL = (TEMPLATES / "mistral.jinja").read_text()

FAMILIES = {
    "llama3": {
        "template": LLAMA3,
        "generation": tagged(
            LLAMA3,
            "    {{- message['content'] | trim + '<|eot_id|>' }}\n",
            "    {%- if message['role'] == 'assistant' %}{% generation %}"
            "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}\n",
        ),
        "added": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "end": "<|eot_id|>",
    },
    "gemma": {
        "template": GEMMA,
        "generation": tagged(
            GEMMA,
            "    {{- message['content'] | trim + '<end_of_turn>\\n' }}\n",
            "    {%- if message['role'] == 'assistant' %}{% generation %}"
            "{{- message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{- '\\n' }}"
            "{%- else %}{{- message['content'] | trim + '<end_of_turn>\\n' }}{%- endif %}\n",
        ),
        "added": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "end": "<end_of_turn>",
    },
    "mistral": {
        "template": MISTRAL,
        "generation": tagged(
            MISTRAL,
            "        {{- ' ' + message['content'] | trim + eos_token }}\n",
            "        {% generation %}{{- ' ' + message['content'] | trim + eos_token }}{% endgeneration %}\n",
        ),
        "added": ["<s>", "</s>", "[INST]", "[/INST]"],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "end": "</s>",
    },
}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CASES = [
    ("single_turn", [u("Hello"), a("Hi there! How can I help?")]),
    ("system", [s("You are a terse assistant."), u("What is 2+2?"), a("4")]),
    (
        "multi_turn",
        [u("Name a colour."), a("Blue."), u("Another one?"), a("Green.\nOr red."), u("Thanks!"), a("You're welcome.")],
    ),
    ("chinese", [s("你是一位诗人。"), u("床前明月光的下一句是什么？"), a("疑是地上霜。\n\n这是李白的《静夜思》。")]),
    (
        "whitespace_and_code",
        [u("Show code:\n\n```py\nx = 1\n```"), a(" Here it is:\n```python\ndef f(x):\n    return x * 2\n```  "), u("ok"), a("Done.\t")],
    ),
]


def tokenizer(family):
    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    added = family["added"]
    n = tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    assert n == len(added)
    tok.bos_token = family["bos_token"]
    tok.eos_token = family["eos_token"]
    return tok


def main():
    rows = []
    for tname, family in FAMILIES.items():
        tok = tokenizer(family)
        template, generation = family["template"], family["generation"]
        end_id = tok.convert_tokens_to_ids(family["end"])
        for name, msgs in CASES:
            text = tok.apply_chat_template(msgs, tokenize=False, chat_template=template)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False, chat_template=template)
            gen_text = tok.apply_chat_template(msgs, tokenize=False, chat_template=generation)
            assert gen_text == text, (tname, name, gen_text, text)
            out = tok.apply_chat_template(
                msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=generation
            )
            assert out["input_ids"] == ids
            mask = out["assistant_masks"]
            turns, start = [], None
            for t, m in enumerate(mask + [0]):
                if m and start is None:
                    start = t
                if not m and start is not None:
                    turns.append([start, t])
                    start = None
            assert len(turns) == sum(1 for m in msgs if m["role"] == "assistant"), (tname, name, turns)
            # The end-of-turn token closes every assistant span: it is trained.
            assert all(ids[b - 1] == end_id for _, b in turns), (tname, name)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt_text = tok.apply_chat_template(
                msgs[:last], tokenize=False, add_generation_prompt=True, chat_template=template
            )
            rows.append(
                {
                    "template": tname,
                    "case": name,
                    "messages": msgs,
                    "tools": None,
                    "variables": {},
                    "record": None,
                    "format": None,
                    "text": text,
                    "ids": ids,
                    "assistant_mask": mask,
                    "turns": turns,
                    "prompt_text": prompt_text,
                    "prompt_ids": tok(prompt_text, add_special_tokens=False)["input_ids"],
                    "tokenizer": {
                        # Some of these strings are already tokens of the Qwen vocabulary; the
                        # added token takes that id, as in the tokenizers library.
                        "added": [[t, tok.convert_tokens_to_ids(t)] for t in family["added"]],
                        "bos_token": family["bos_token"],
                        "eos_token": family["eos_token"],
                        "end": family["end"],
                    },
                }
            )
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
