"""Golden token ids for the Qwen tokenizer fixture, produced by Hugging Face `transformers`.

Run from the repository root with a Python that has `transformers` (tested with 5.23.0,
tokenizers 0.23.3):

    python tests/data/scripts/golden_tokenizer.py

Writes tests/data/golden/tokenizer_ids.jsonl: one {"text", "ids", "tokens", "decoded",
"decoded_skip_special"} object per text, where ids = tokenizer(text, add_special_tokens=False).
"""
import json
import pathlib

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests/data/qwen3-tokenizer"
OUT = ROOT / "tests/data/golden/tokenizer_ids.jsonl"

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "混合 mixed 文本 text 123 ４５６",
    "emoji: 🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇨🇳🇫🇷",
    "tabs\tand\t\ttabs",
    "spaces   between    words     ",
    "   leading spaces",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\nendings",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nLet me think.\n</think>\n\nThe answer is 4.<|im_end|>",
    "text<|im_end|>glued<|endoftext|>together",
    "<|im_start|> spaced special <|im_end|>",
    "numbers 1234567890 and 3.14159 and -42",
    "contractions: I'm, you're, they've, it's, WE'LL, He'D",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": "value", "list": [1, 2, 3]}',
    "e\u0301 combining accent vs \u00e9 precomposed",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "العربية نص",
    "math ∑∫√∞ ≤ ≥ ≠",
    "zero\u200bwidth\u200bspace",
    "a" * 50,
    "<|fim_prefix|>code<|fim_suffix|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
]


def main():
    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    with OUT.open("w", encoding="utf-8") as f:
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            row = {
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(TEXTS)} rows to {OUT}")


if __name__ == "__main__":
    main()
