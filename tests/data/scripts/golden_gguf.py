"""GGUF fixtures written by llama.cpp's own `gguf` package, and goldens from `transformers`' GGUF
loader, for sft's GGUF reading and writing.

Run from the repository root with a Python that has torch, transformers, gguf, tokenizers and
sentencepiece (produced with torch 2.15.0, transformers 5.25.0, gguf 0.19.0, tokenizers 0.23.3,
sentencepiece 0.2.3, on CPU):

    python tests/data/scripts/golden_gguf.py

It writes, under tests/data/gguf/:
- NAME/ for NAME in llama, qwen2, qwen3, gemma3: a tiny random Hugging Face checkpoint with a
  tokenizer (config.json, model.safetensors in float32, tokenizer.json, tokenizer_config.json);
  the byte-level BPE tokenizers are trained here with `tokenizers` on CORPUS, Gemma's is a
  SentencePiece BPE model with byte fallback trained with `sentencepiece`, turned into the
  `tokenizer.json` transformers builds from its GGUF file;
- NAME.gguf: that checkpoint as llama.cpp's converter (convert_hf_to_gguf.py) writes it, with
  gguf-py's tensor names (`TensorNameMap`), the Q/K permutation of llama, Gemma's `1 + w`
  norms, and tensors in several ggml types quantized by gguf-py (Q4_1, Q8_0, F16, BF16, Q5_0);
- golden.json:
  - "fixtures": for each NAME.gguf, the logits transformers computes for a right-padded batch
    after loading the file (`from_pretrained(dir, gguf_file=...)`, which dequantizes) at each
    real position (the first 48 ids' logits, the log-sum-exp over the vocabulary, the argmax),
    and the ids its tokenizer built from the file gives the TEXTS;
  - "exports": files written by `sft export` (run here with the debug build of this repository)
    from the NAME/ checkpoints and from a wider random checkpoint (`wide.json`, rows of 256
    values, so the K types are written rather than their fallbacks): each file's FNV-1a hash
    (the test exports again and compares), and transformers' logits after loading it;
  - "qwen_tokenizer": the ids transformers' tokenizer gives the TEXTS after loading a file that
    `sft export` wrote with the Qwen tokenizer fixture (tests/data/qwen3-tokenizer);
  - "llama3_rope_freqs": the `rope_freqs.weight` llama.cpp's converter computes for
    tests/data/models/llama3's Llama 3 RoPE scaling.

Everything is generated here from fixed seeds, so no third-party licence applies.
"""
import io
import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = pathlib.Path(__file__).resolve().parents[3]
OUT = ROOT / "tests/data/gguf"
sys.path.insert(0, str(ROOT / "tests/data/scripts"))
from golden_tokenizer import TEXTS  # noqa: E402

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
    "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | "
    "trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
    "{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "Fine-tuning a language model on a laptop is slow but possible.",
    "What is the capital of France? The capital of France is Paris.",
    "The harbour town of Veldmoor has three bridges and one lighthouse.",
    "user assistant system model answer question",
    "def f(x):\n    return x ** 2  # square\n",
    "numbers 1234567890 and 3.14159 and -42",
    "I'm sure you're right, they've said it's fine and we'll see.",
] * 8

# Row 0 is full; row 1 has 7 real tokens, right-padded with id 0 (all ids below 256: every
# vocabulary here has at least 300 tokens).
INPUT_IDS = [
    [1, 17, 200, 45, 3, 99, 128, 255, 64, 5, 77, 31],
    [1, 250, 8, 8, 8, 140, 60, 0, 0, 0, 0, 0],
]
ATTENTION_MASK = [[1] * 12, [1] * 7 + [0] * 5]

LOGIT_COLUMNS = 48

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def bpe_tokenizer(split, ignore_merges):
    """A byte-level BPE of 320 tokens (3 special, 256 bytes, 61 merges), split by `split`."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_bpe(tok, dir):
    dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(dir / "tokenizer.json"))
    (dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "add_bos_token": False,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "chat_template": CHATML,
            },
            indent=2,
        )
        + "\n"
    )


def spm_model():
    """A SentencePiece BPE model with byte fallback in Gemma's id layout."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        # GemmaTokenizer adds a <mask> of its own where the vocabulary has none.
        control_symbols=["<mask>"],
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                # Gemma stores gains around 0 (it multiplies by 1 + w), the others around 1.
                base = 0.0 if isinstance(model, Gemma3ForCausalLM) else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, model, vocab, types):
    """The checkpoint as convert_hf_to_gguf.py writes it: `types(gguf_name, array)` picks the ggml
    type of each matrix (vectors are F32, as the converter writes them)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type("model")
    w.add_name(path.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = cfg.rope_parameters
    if arch == gguf.MODEL_ARCH.GEMMA3:
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab(w)

    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.detach().float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if arch == gguf.MODEL_ARCH.GEMMA3 and hf_name.endswith("norm.weight"):
            data = data + 1
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        qtype = types(name, data) if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_vocab(tok, pre):
    """`_set_vocab_gpt2`: tokens in id order (byte-level spelling), CONTROL for the special ones,
    merges "left right"."""
    data = json.loads(tok.to_str())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_pad_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)

    return len(tokens), add


def spm_vocab(sp):
    """`_set_vocab_sentencepiece` as Gemma 3's converter runs it (no space prefix, BOS added)."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        elif sp.id_to_piece(i) in ("<start_of_turn>", "<end_of_turn>"):
            t = gguf.TokenType.USER_DEFINED
        else:
            t = gguf.TokenType.NORMAL
        types.append(t)

    def add(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_pad_token_id(sp.pad_id())
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        w.add_chat_template(GEMMA_TEMPLATE)

    return len(tokens), add


def gguf_logits(path):
    """transformers' logits for the batch after loading a GGUF file, and the model. At each real
    position: the logits of the first LOGIT_COLUMNS ids (5 decimals) and the log-sum-exp over the
    whole vocabulary, which every logit moves (all of them would make the file megabytes)."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT_IDS), attention_mask=torch.tensor(ATTENTION_MASK)).logits
    out = []
    for b, mask in enumerate(ATTENTION_MASK):
        for i in range(sum(mask)):
            row = logits[b, i]
            out.append({
                "head": [round(x, 5) for x in row[:LOGIT_COLUMNS].tolist()],
                "lse": round(torch.logsumexp(row.double(), 0).item(), 6),
                "argmax": int(row.argmax()),
            })
    return out, model


def fnv1a(path):
    """FNV-1a (64 bits) of a file's bytes: a fingerprint the Rust test computes without a hash
    crate, to know it exported the very bytes transformers read here."""
    h = 0xCBF29CE484222325
    for b in path.read_bytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def sft(*args):
    subprocess.run(["cargo", "run", "-q", "-p", "sft-cli", "--", *args], cwd=ROOT, check=True)


def llama3_rope_freqs():
    """LlamaModel.generate_extra_tensors for tests/data/models/llama3."""
    cfg = json.loads((ROOT / "tests/data/models/llama3/config.json").read_text())
    rope = cfg["rope_parameters"]
    base, dim = rope["rope_theta"], cfg["head_dim"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).tolist()


def main():
    torch.manual_seed(0)
    T = gguf.GGMLQuantizationType
    qwen_tok = bpe_tokenizer(QWEN2_SPLIT, ignore_merges=False)
    llama_tok = bpe_tokenizer(LLAMA3_SPLIT, ignore_merges=True)
    sp = spm_model()
    n_qwen, qwen_vocab = bpe_vocab(qwen_tok, "qwen2")
    n_llama, llama_vocab = bpe_vocab(llama_tok, "llama-bpe")
    n_gemma, gemma_vocab = spm_vocab(sp)

    fixtures = {
        # Llama: q/k rows permuted in the file; Q4_1 matrices and a Q8_0 embedding (SmolLM2's
        # mix); tied head.
        "llama": (
            LlamaForCausalLM(LlamaConfig(**COMMON, vocab_size=n_llama, tie_word_embeddings=True, rope_theta=1e4)),
            gguf.MODEL_ARCH.LLAMA,
            llama_tok,
            llama_vocab,
            lambda name, a: T.Q8_0 if name == "token_embd.weight" else T.Q4_1,
        ),
        # Qwen2: q/k/v biases, untied head; F16 and BF16 matrices.
        "qwen2": (
            Qwen2ForCausalLM(Qwen2Config(**COMMON, vocab_size=n_qwen, tie_word_embeddings=False, rope_theta=1e6)),
            gguf.MODEL_ARCH.QWEN2,
            qwen_tok,
            qwen_vocab,
            lambda name, a: T.BF16 if "ffn" in name else T.F16,
        ),
        # Qwen3: q/k norms, head_dim 128 (transformers reads no head size from a qwen3 file and
        # takes Qwen3Config's default 128); F32 matrices, Q5_0 for attn_v.
        "qwen3": (
            Qwen3ForCausalLM(
                Qwen3Config(
                    **{**COMMON, "num_attention_heads": 1, "num_key_value_heads": 1},
                    vocab_size=n_qwen,
                    head_dim=128,
                    tie_word_embeddings=True,
                    rope_theta=1e6,
                )
            ),
            gguf.MODEL_ARCH.QWEN3,
            qwen_tok,
            qwen_vocab,
            lambda name, a: T.Q5_0 if "attn_v" in name else T.F32,
        ),
        # Gemma 3: `1 + w` norms, q/k norms, both layers sliding (window 4 < 12 positions: the
        # default period of 6 makes layers 0-4 slide), head_dim 256 (transformers' default
        # query_pre_attn_scalar, which a GGUF file does not carry; llama.cpp scales by head_dim);
        # SentencePiece vocabulary; Q8_0 matrices.
        "gemma3": (
            Gemma3ForCausalLM(
                Gemma3TextConfig(
                    **{**COMMON, "num_attention_heads": 1, "num_key_value_heads": 1},
                    vocab_size=n_gemma,
                    head_dim=256,
                    query_pre_attn_scalar=256,
                    sliding_window=4,
                    layer_types=["sliding_attention", "sliding_attention"],
                    tie_word_embeddings=True,
                    rope_parameters={
                        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    },
                    pad_token_id=0,
                    eos_token_id=1,
                    bos_token_id=2,
                )
            ),
            gguf.MODEL_ARCH.GEMMA3,
            None,
            gemma_vocab,
            lambda name, a: T.Q8_0,
        ),
    }
    golden = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": "0.19.0",
        },
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "texts": TEXTS,
        "fixtures": {},
        "exports": {},
    }
    for seed, (name, (model, arch, tok, vocab, types)) in enumerate(fixtures.items()):
        model.config._attn_implementation = "eager"
        randomise(model, 2000 + seed)
        model.eval()
        path = OUT / f"{name}.gguf"
        write_gguf(path, arch, model, vocab, types)
        hf = OUT / name
        shutil.rmtree(hf, ignore_errors=True)
        model.save_pretrained(hf, safe_serialization=True)
        (hf / "generation_config.json").unlink(missing_ok=True)
        if tok is not None:
            save_bpe(tok, hf)
        else:
            # Gemma's tokenizer.json is the one transformers builds from the file.
            AutoTokenizer.from_pretrained(str(OUT), gguf_file=path.name).save_pretrained(hf)
        logits, loaded = gguf_logits(path)
        # transformers read the file as written: the same weights (to the file's rounding).
        ours = model.state_dict()
        for k, v in loaded.state_dict().items():
            if k in ours:
                err = (v - ours[k]).abs().max().item()
                assert err < 0.05, (name, k, err)
        hf_tok = AutoTokenizer.from_pretrained(str(OUT), gguf_file=path.name)
        ids = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        golden["fixtures"][name] = {"logits": logits, "ids": ids}
        print(f"{name}.gguf: {path.stat().st_size} bytes")

    # sft's own exports, read by transformers.
    wide = OUT / "wide.json"
    wide.write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": n_qwen, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rope_theta": 1e6, "tie_word_embeddings": True,
        "initializer_range": 0.05, "eos_token_id": qwen_tok.token_to_id("<|im_end|>"),
    }, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(["cargo", "run", "-q", "-p", "xtask", "--", "init-model", "--config", str(wide),
                        "--seed", "7", "--out", str(tmp / "wide")], cwd=ROOT, check=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(OUT / "qwen2" / f, tmp / "wide" / f)
        jobs = [(n, q) for n in fixtures for q in ("f32", "q8_0")]
        jobs += [("wide", q) for q in ("q4_k_m", "q6_k", "q4_0")]
        for name, quant in jobs:
            src = tmp / "wide" if name == "wide" else OUT / name
            out = tmp / f"{name}-{quant}.gguf"
            sft("export", "--model", str(src), "--out", str(out), "--quant", quant, "--name", name)
            logits, _ = gguf_logits(out)
            golden["exports"][f"{name}-{quant}"] = {"fnv1a": fnv1a(out), "logits": logits}
            print(f"{name}-{quant}: {out.stat().st_size} bytes")

        # The Qwen tokenizer fixture through sft's GGUF vocabulary and transformers' reader.
        qdir = tmp / "qwen-tok"
        qcfg = tmp / "qwen-tok.json"
        qcfg.write_text(json.dumps({
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8,
            "max_position_embeddings": 64, "rope_theta": 1e6, "tie_word_embeddings": True,
        }))
        subprocess.run(["cargo", "run", "-q", "-p", "xtask", "--", "init-model", "--config", str(qcfg),
                        "--out", str(qdir), "--tokenizer", str(ROOT / "tests/data/qwen3-tokenizer")],
                       cwd=ROOT, check=True)
        out = tmp / "qwen-tok.gguf"
        sft("export", "--model", str(qdir), "--out", str(out), "--quant", "f32")
        hf_tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=out.name)
        golden["qwen_tokenizer"] = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    golden["llama3_rope_freqs"] = llama3_rope_freqs()
    (OUT / "golden.json").write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main()
