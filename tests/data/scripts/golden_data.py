"""Golden chat renderings and assistant masks for `sft-data`, produced by Hugging Face `transformers`.

Run from the repository root with a Python that has `transformers` (tested with 5.23.0,
tokenizers 0.23.3, jinja2 3.1.6):

    python tests/data/scripts/golden_data.py

Writes tests/data/golden/chat_templates.jsonl, one object per (template, case):

    {"template": "qwen3" | "qwen2.5", "case": name, "messages": [...], "tools": [...] | null,
     "variables": {...}, "record": {...} | null, "format": name | null,
     "text": str, "ids": [int], "assistant_mask": [0|1] | null, "turns": [[start, end], ...] | null,
     "prompt_text": str, "prompt_ids": [int]}

- text / ids: `apply_chat_template(messages, tools=..., tokenize=False)` and the ids of that text
  (`tokenizer(text, add_special_tokens=False)`, as `apply_chat_template(tokenize=True)` does).
- assistant_mask: `return_assistant_tokens_mask=True` with a copy of the template whose assistant
  bodies, from after `<|im_start|>assistant\n` through `<|im_end|>`, are wrapped in
  `{% generation %}...{% endgeneration %}` (the copies are below; the script checks that they
  render exactly the original text). `turns` are the token ranges of each generation block, so
  the "last turn only" mask is the last range. Null for cases whose mask is not defined this way
  (Qwen3 with enable_thinking=false: the empty think block is then part of the prompt).
- prompt_text / prompt_ids: the messages before the last assistant message, rendered with
  `add_generation_prompt=True`: what a model is given to generate the last answer.
- record / format: for cases built from a ShareGPT, Alpaca or instruct/label record, the raw
  record; `messages` is what this script converts it to, following LLaMA-Factory's rules (system
  column first, `instruction + "\n" + input`, `instruct + input`), independently of the Rust
  reader.

The Qwen3 template is the fixture tokenizer's own (tests/data/qwen3-tokenizer); the Qwen2.5 one is
tests/data/templates/qwen2.5.jinja.
"""
import json
import pathlib

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests/data/qwen3-tokenizer"
QWEN25 = (ROOT / "tests/data/templates/qwen2.5.jinja").read_text()
OUT = ROOT / "tests/data/golden/chat_templates.jsonl"

# The Qwen2.5 template with every assistant body inside {% generation %}. Only the assistant
# branches differ from qwen2.5.jinja; the tool-call branch emits the same text in another order
# of concatenation ("\n" moved from before the content to the header).
QWEN25_GENERATION = QWEN25.replace(
    """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}""",
    """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}""",
)
assert QWEN25_GENERATION != QWEN25


def qwen3_generation(template):
    old = """        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}"""
    new = """        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- content }}
            {%- endif %}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- if message.tool_calls %}"""
    assert template.count(old) == 1
    template = template.replace(old, new)
    old_end = """            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}"""
    new_end = """            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif message.role == "tool" %}"""
    assert template.count(old_end) == 1
    return template.replace(old_end, new_end)


def u(text):
    return {"role": "user", "content": text}


def a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def s(text):
    return {"role": "system", "content": text}


def tool(text):
    return {"role": "tool", "content": text}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city, in °C or °F.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "城市名称"},
                    "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}},
]

CASES = [
    ("single_turn", [u("Hello"), a("Hi there! How can I help?")], None),
    ("system", [s("You are a terse assistant."), u("What is 2+2?"), a("4")], None),
    (
        "multi_turn",
        [u("Name a colour."), a("Blue."), u("Another one?"), a("Green.\nOr red."), u("Thanks!"), a("You're welcome.")],
        None,
    ),
    (
        "chinese",
        [s("你是一位诗人。"), u("床前明月光的下一句是什么？"), a("疑是地上霜。\n\n这是李白的《静夜思》。")],
        None,
    ),
    (
        "whitespace_and_code",
        [u("Show code:\n\n```py\nx = 1\n```"), a(" Here it is:\n```python\ndef f(x):\n    return x * 2\n```  "), u("ok"), a("Done.\t")],
        None,
    ),
    (
        "reasoning_content",
        [
            u("What is 3*7?"),
            a("21", reasoning_content="3 times 7 is 21."),
            u("And 3*8?"),
            a("24", reasoning_content="\nAdd 3 to 21.\n"),
        ],
        None,
    ),
    (
        "think_in_content",
        [u("Is 7 prime?"), a("<think>\nCheck divisors 2..sqrt(7).\n</think>\n\nYes, 7 is prime.")],
        None,
    ),
    (
        "tool_calls",
        [
            s("Use tools when needed."),
            u("Weather in Paris and the time?"),
            a("", tool_calls=[call("get_weather", {"city": "Paris", "days": 2, "scale": 1.5}), call("now", {})]),
            tool('{"temp": 21.5}'),
            tool("12:00"),
            a("It is 21.5 °C in Paris and 12:00."),
        ],
        WEATHER_TOOLS,
    ),
    (
        "tool_call_with_content_and_string_args",
        [
            u("Weather in 北京?"),
            a("Let me check.", tool_calls=[call("get_weather", '{"city": "北京"}')]),
            tool("晴 25°C"),
            a("北京晴，25°C。"),
        ],
        WEATHER_TOOLS,
    ),
    (
        "tool_calls_no_tools_list",
        [u("Time?"), a("", tool_calls=[{"function": {"name": "now", "arguments": {}}}]), tool("09:30"), a("09:30.")],
        None,
    ),
]

THINKING_OFF = [
    (
        "qwen3_enable_thinking_false",
        [u("Hi"), a("Hello!"), u("Bye"), a("Goodbye!")],
        None,
    ),
]

RECORDS = [
    (
        "sharegpt",
        {
            "system": "Be kind.",
            "conversations": [
                {"from": "human", "value": "What's the capital of France?"},
                {"from": "gpt", "value": "Paris."},
                {"from": "human", "value": "And of Japan?"},
                {"from": "gpt", "value": "Tokyo."},
            ],
        },
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Time?"},
                {"from": "function_call", "value": '{"name": "now", "arguments": {}}'},
                {"from": "observation", "value": "10:00"},
                {"from": "gpt", "value": "It is 10:00."},
            ],
            "tools": json.dumps(WEATHER_TOOLS[1:]),
        },
    ),
    ("alpaca", {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}),
    ("alpaca", {"instruction": "Give a synonym of happy.", "input": "", "output": "Glad.", "system": "Answer briefly."}),
    ("instruct_label", {"instruct": "提取人名：", "input": "李白和杜甫是朋友。", "label": "李白, 杜甫"}),
]

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool"}


def record_to_messages(fmt, rec):
    """LLaMA-Factory's conversions, written independently of the Rust reader."""
    if fmt == "sharegpt":
        msgs = [s(rec["system"])] if rec.get("system") else []
        for turn in rec["conversations"]:
            if turn["from"] == "function_call":
                c = json.loads(turn["value"])
                msgs.append(a("", tool_calls=[call(c["name"], c["arguments"])]))
            else:
                msgs.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        tools = json.loads(rec["tools"]) if rec.get("tools") else None
        return msgs, tools
    if fmt == "alpaca":
        msgs = [s(rec["system"])] if rec.get("system") else []
        user = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
        return msgs + [u(user), a(rec["output"])], None
    if fmt == "instruct_label":
        return [u(rec["instruct"] + rec.get("input", "")), a(rec["label"])], None
    raise ValueError(fmt)


def main():
    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    qwen3 = tok.chat_template
    templates = {
        "qwen3": (qwen3, qwen3_generation(qwen3)),
        "qwen2.5": (QWEN25, QWEN25_GENERATION),
    }
    cases = [(name, msgs, tools, {}, None, None) for name, msgs, tools in CASES]
    cases += [(name, msgs, tools, {"enable_thinking": False}, None, None) for name, msgs, tools in THINKING_OFF]
    for i, (fmt, rec) in enumerate(RECORDS):
        msgs, tools = record_to_messages(fmt, rec)
        cases.append((f"record_{i}_{fmt}", msgs, tools, {}, rec, fmt))
    rows = []
    for tname, (template, generation) in templates.items():
        for name, msgs, tools, variables, rec, fmt in cases:
            if "enable_thinking" in variables and tname != "qwen3":
                continue
            text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, chat_template=template, **variables)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=False, chat_template=template, **variables)
            mask, turns = None, None
            if not variables:
                gen_text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, chat_template=generation)
                assert gen_text == text, (tname, name, gen_text, text)
                out = tok.apply_chat_template(
                    msgs,
                    tools=tools,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                    chat_template=generation,
                )
                assert out["input_ids"] == ids
                mask = out["assistant_masks"]
                # Token ranges of the generation blocks, found again from the mask's runs.
                turns, start = [], None
                for t, m in enumerate(mask + [0]):
                    if m and start is None:
                        start = t
                    if not m and start is not None:
                        turns.append([start, t])
                        start = None
                n_assistant = sum(1 for m in msgs if m["role"] == "assistant")
                assert len(turns) == n_assistant, (tname, name, turns)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt_text = tok.apply_chat_template(
                msgs[:last], tools=tools, tokenize=False, add_generation_prompt=True, chat_template=template, **variables
            )
            rows.append(
                {
                    "template": tname,
                    "case": name,
                    "messages": msgs,
                    "tools": tools,
                    "variables": variables,
                    "record": rec,
                    "format": fmt,
                    "text": text,
                    "ids": ids,
                    "assistant_mask": mask,
                    "turns": turns,
                    "prompt_text": prompt_text,
                    "prompt_ids": tok(prompt_text, add_special_tokens=False)["input_ids"],
                }
            )
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
