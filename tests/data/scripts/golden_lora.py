"""LoRA interop goldens from PEFT: adapters PEFT makes for `sft` to load, and adapters `sft` made
loaded by PEFT. Run from the repository root with a Python that has torch, transformers and peft
(produced with torch 2.15.0, transformers 5.25.0, peft 0.21.2, on CPU):

    target/bench-venv/bin/python tests/data/scripts/golden_lora.py

It writes
- tests/data/models/qwen2-untied-lora-peft/: `get_peft_model` on `qwen2-untied` with r=4,
  lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], init_lora_weights=False
  (A and B random, so the adapter changes the logits), the saved copy of lm_head perturbed too;
- tests/data/models/qwen3-lora-peft/: on `qwen3`, r=8, lora_alpha=16, use_rslora=True,
  target_modules=["q_proj", "v_proj", "down_proj"];
  both saved with `save_pretrained`, `base_model_name_or_path` rewritten to the base's path
  relative to the adapter directory and `target_modules` sorted (PEFT writes that set in hash
  order), PEFT's README.md model card removed;
- tests/data/models/lora.golden.json: for the batch of golden_model.py (`input_ids`,
  `attention_mask`), under "peft" the float32 logits of each adapter above as PEFT computes them
  (`logits`) and after `merge_and_unload()` (`merged_logits`); under "sft" the same for the
  adapters `sft` trained (`qwen2-tied-lora-sft`, `qwen2-untied-lora-sft`, made with
  tests/data/models/lora/train-sft-adapter.toml), loaded with `PeftModel.from_pretrained`.

Rerunning it reproduces the files (fixed seeds); each PEFT adapter is also reloaded with
`PeftModel.from_pretrained` and must give the same logits, which catches a save problem here
rather than in the Rust tests.
"""
import json
import pathlib
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODELS = ROOT / "tests/data/models"
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from golden_model import ATTENTION_MASK, INPUT_IDS  # noqa: E402

PEFT_MADE = [
    (
        "qwen2-untied",
        "qwen2-untied-lora-peft",
        dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]),
    ),
    (
        "qwen3",
        "qwen3-lora-peft",
        dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
]
SFT_MADE = [("qwen2-tied", "qwen2-tied-lora-sft"), ("qwen2-untied", "qwen2-untied-lora-sft")]


def base(name):
    return AutoModelForCausalLM.from_pretrained(
        MODELS / name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def logits(model):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(INPUT_IDS), attention_mask=torch.tensor(ATTENTION_MASK)
        ).logits
    return out.float()


def as_list(t):
    return [[[float(f"{v:.7g}") for v in pos] for pos in row] for row in t.tolist()]


def make_peft_adapter(base_name, adapter, kwargs, seed):
    torch.manual_seed(seed)
    cfg = LoraConfig(lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM", **kwargs)
    model = get_peft_model(base(base_name), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    out = MODELS / adapter
    model.save_pretrained(out)
    config = out / "adapter_config.json"
    c = json.loads(config.read_text())
    c["base_model_name_or_path"] = f"../{base_name}"
    # PEFT keeps target_modules as a set and writes it in hash order, which changes from run to
    # run; sorted, the file is reproducible (PEFT reads the list back into a set).
    if isinstance(c["target_modules"], list):
        c["target_modules"] = sorted(c["target_modules"])
    config.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    return model.eval()


def entry(base_name, adapter, model):
    got = logits(model)
    merged = logits(model.merge_and_unload())
    return {"base": base_name, "adapter": adapter, "logits": as_list(got), "merged_logits": as_list(merged)}


def main():
    golden = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "peft": [], "sft": []}
    for i, (base_name, adapter, kwargs) in enumerate(PEFT_MADE):
        model = make_peft_adapter(base_name, adapter, kwargs, seed=1000 + i)
        made = logits(model)
        reloaded = PeftModel.from_pretrained(base(base_name), MODELS / adapter).eval()
        assert torch.equal(made, logits(reloaded)), f"{adapter}: reloading changed the logits"
        assert (made - logits(base(base_name))).abs().max() > 1e-2, f"{adapter}: no effect"
        golden["peft"].append(entry(base_name, adapter, reloaded))
    for base_name, adapter in SFT_MADE:
        if not (MODELS / adapter / "adapter_config.json").is_file():
            print(f"skipping {adapter}: not there (see tests/data/models/lora/)", file=sys.stderr)
            continue
        model = PeftModel.from_pretrained(base(base_name), MODELS / adapter).eval()
        assert (logits(model) - logits(base(base_name))).abs().max() > 1e-2, f"{adapter}: no effect"
        golden["sft"].append(entry(base_name, adapter, model))
    path = MODELS / "lora.golden.json"
    path.write_text(json.dumps(golden) + "\n")
    print(
        f"wrote {path} (torch {torch.__version__}, peft {__import__('peft').__version__}, "
        f"transformers {__import__('transformers').__version__})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
