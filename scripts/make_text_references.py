#!/usr/bin/env python3
"""References for the text side and the real-model tests, from transformers.

Pinned: torch==2.11.0, transformers==5.24.0, gguf==0.19.0, accelerate==1.16.0, numpy (any 2.x). Run with a
venv holding them:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.11.0 \
        transformers==5.24.0 gguf==0.19.0 accelerate==1.16.0
    /tmp/venv/bin/python scripts/make_text_references.py "$(scripts/fetch-smollm2.sh)"

Writes tests/fixtures/smollm2/*.json (small: top logits only, a sample of each tensor):
- greedy.json: float32 greedy decode of a few prompts (16 tokens each) by transformers
  on the GGUF's weights dequantized by transformers, with each step's top-5 logits;
- dequant.json: values of a few tensors dequantized by the gguf package (gguf-py, the
  reference implementation of llama.cpp's Python side), and of the unpermuted q/k
  projections as transformers loads them;
- tokenizer_corpus.json: ids of a test corpus by transformers' tokenizer built from the GGUF,
  and the decoded text;
- chat.json: conversations rendered by apply_chat_template;
- sampling.json: transformers' logits processors on fixed logits;
- ../gguf-blocks.json: random blocks of every quantized type fusec reads, dequantized
  by gguf-py;
- ../tiny-spm/: a small SentencePiece vocabulary as a GGUF file (written by gguf-py) and
  transformers' encodings with it.
"""

import json
import math
import os
import random
import sys

import numpy as np
import torch
import transformers
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

assert torch.__version__.startswith("2.11.0"), torch.__version__
assert transformers.__version__ == "5.24.0", transformers.__version__

GGUF = sys.argv[1]
# A second argument `sampling`, `spm` and/or `blocks` (comma-separated): only those parts, which
# need no model.
PARTS = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else {"all"}
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)


def write(name, data):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


def f32(x):
    """A float32 as the shortest decimal that reads back to it."""
    return float(np.float32(x))


# ---- sampling processors -------------------------------------------------------------
g = torch.Generator().manual_seed(0)
logits = torch.randn(1, 64, generator=g)
seen = torch.tensor([[3, 5, 5, 17, 40]])
settings = [
    {"repetition_penalty": 1.3},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2},
]
samp_cases = []
for s in settings:
    x = logits.clone()
    if "repetition_penalty" in s:
        x = RepetitionPenaltyLogitsProcessor(s["repetition_penalty"])(seen, x)
    if "temperature" in s:
        x = TemperatureLogitsWarper(s["temperature"])(seen, x)
        if "top_k" in s:
            x = TopKLogitsWarper(s["top_k"])(seen, x)
        if "top_p" in s:
            x = TopPLogitsWarper(s["top_p"])(seen, x)
        if "min_p" in s:
            x = MinPLogitsWarper(s["min_p"])(seen, x)
    out = [None if math.isinf(v) else f32(v) for v in x[0].tolist()]
    samp_cases.append({"options": s, "processed": out})
write(
    "sampling.json",
    {"logits": [f32(v) for v in logits[0].tolist()], "seen": seen[0].tolist(), "cases": samp_cases},
)
# ---- a SentencePiece vocabulary in GGUF (tests/fixtures/tiny-spm) ------------------
def write_to(directory, name, data):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


if "spm" in PARTS or "all" in PARTS:
    from gguf import GGUFWriter, TokenType

    out_dir = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-spm")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tiny-spm.gguf")
    # A small SentencePiece vocabulary: specials, the 256 byte tokens, then pieces with
    # scores (higher merges first), no merges in the file, as llama.cpp writes Llama 2's.
    pieces = ["▁", "e", "t", "h", "a", "o", "n", "s", "i", "r", "l", "d", "c", "u", "▁t", "he",
              "▁the", "▁a", "in", "er", "an", "on", "▁s", "▁c", "at", "en", "re", "▁th", "is",
              "▁is", "it", "▁it", "or", "ar", "▁w", "ll", "▁o", "ou", "▁on", "ing", "▁in", "ed",
              "▁and", "nd", "▁h", "▁he", "le", "es", "st", "▁be", "1", "2", "3", "é", "日", "本"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
    w = GGUFWriter(path, "llama")
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8)
    w.add_feed_forward_length(16); w.add_head_count(2); w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(10000.0); w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tok = AutoTokenizer.from_pretrained(out_dir, gguf_file="tiny-spm.gguf")
    corpus = ["the cat is on the hat", " the", "  leading", "hello world", "tin 123 é 日本 ü",
              "</s> and <s> in text", "it is in the\nnext line", "", "a", "ouch!"]
    cases = [{"text": t, "ids": tok(t)["input_ids"], "decoded": tok.decode(tok(t)["input_ids"])} for t in corpus]
    write_to(out_dir, "expected.json", {"cases": cases})
# ---- dequantization of every block type, by gguf-py (tests/fixtures/gguf-blocks.json) --
if "blocks" in PARTS or "all" in PARTS:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    block_rng = np.random.default_rng(0)
    # (type, blocks, bytes per block, offsets of its f16 scales)
    layouts = [
        (Q.Q4_0, 2, 18, [0]),
        (Q.Q4_1, 2, 20, [0, 2]),
        (Q.Q8_0, 2, 34, [0]),
        (Q.Q4_K, 1, 144, [0, 2]),
        (Q.Q5_K, 1, 176, [0, 2]),
        (Q.Q6_K, 1, 210, [208]),
    ]
    block_cases = []
    for ty, n, size, halves in layouts:
        raw = block_rng.integers(0, 256, size=n * size, dtype=np.uint8)
        for b in range(n):
            for at in halves:
                h = np.float16(block_rng.uniform(-0.1, 0.1)).view(np.uint16)
                raw[b * size + at] = h & 0xFF
                raw[b * size + at + 1] = h >> 8
        values = gguf_dequantize(raw, ty).astype(np.float32).reshape(-1)
        block_cases.append({"type": ty.name, "hex": raw.tobytes().hex(), "values": [f32(v) for v in values]})
    for ty, dt in [(Q.F16, np.float16), (Q.BF16, None)]:
        if dt is not None:
            raw = block_rng.standard_normal(32).astype(np.float16).view(np.uint8)
        else:
            bits = (block_rng.standard_normal(32).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            raw = bits.view(np.uint8)
        values = gguf_dequantize(raw, ty).astype(np.float32).reshape(-1)
        block_cases.append({"type": ty.name, "hex": raw.tobytes().hex(), "values": [f32(v) for v in values]})
    write_to(os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"), "gguf-blocks.json", {"cases": block_cases})

if PARTS <= {"sampling", "spm", "blocks"}:
    sys.exit(0)

directory, name = os.path.split(GGUF)
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)

# ---- dequantization -------------------------------------------------------------
reader = GGUFReader(GGUF)
tensors = {t.name: t for t in reader.tensors}
dequant = {}
for tname in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.attn_norm.weight"]:
    t = tensors[tname]
    values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    idx = sorted({i for i in [0, 1, 2, 31, 32, 33, 1000, len(values) // 2, len(values) - 1] if i < len(values)})
    dequant[tname] = {
        "type": t.tensor_type.name,
        "shape": [int(d) for d in reversed(t.shape)],
        "indices": idx,
        "values": [f32(values[i]) for i in idx],
        "sum": float(values.astype(np.float64).sum()),
        "sum_of_squares": float((values.astype(np.float64) ** 2).sum()),
    }

model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
model.eval()
state = model.state_dict()
for hf in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]:
    w = state[hf].float().numpy()
    rows = [0, 1, 31, 32, 33, 63, 64, w.shape[0] - 1]
    dequant[hf] = {
        "shape": list(w.shape),
        "rows": rows,
        "first_values": [[f32(v) for v in w[r, :4]] for r in rows],
    }
write("dequant.json", dequant)

# ---- greedy decode ---------------------------------------------------------------
prompts = [
    {"text": "The capital of France is", "chat": False},
    {"text": "def fibonacci(n):", "chat": False},
    {"text": "Once upon a time, in a small village,", "chat": False},
    {"text": "What is the capital of France?", "chat": True},
]
greedy = {"new_tokens": 16, "cases": []}
with torch.no_grad():
    for p in prompts:
        if p["chat"]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": p["text"]}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p["text"])["input_ids"]
        ids = [int(i) for i in ids]
        seq = list(ids)
        steps = []
        for _ in range(greedy["new_tokens"]):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            top = torch.topk(logits, 5)
            nxt = int(torch.argmax(logits))
            steps.append(
                {
                    "top_ids": [int(i) for i in top.indices],
                    "top_logits": [f32(v) for v in top.values],
                }
            )
            seq.append(nxt)
        generated = seq[len(ids):]
        greedy["cases"].append(
            {
                "text": p["text"],
                "chat": p["chat"],
                "prompt": ids,
                "generated": generated,
                "decoded": tokenizer.decode(generated),
                "steps": steps,
            }
        )
write("greedy.json", greedy)

# ---- tokenizer corpus ------------------------------------------------------------
rng = random.Random(0)
corpus = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\t  \n",
    "Hello, world!",
    "The capital of France is",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "tabs\tand\nnewlines\r\n",
    "2024-12-04 12:34:56.789",
    "1234567890 0.5 -17 3.14159 1e-10 1,000,000",
    "Ünïcödé: naïve café, Straße, smørrebrød",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "Ελληνικά, Русский, עברית, العربية, हिन्दी",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>text after<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n",
    "I'm sure you'll see they've done it; we'd go. It's OK",
    "HTML: <div class=\"a\">&amp;</div>",
    "URL https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "mixed123numbers456and789letters",
]
pieces = ["the", " the", "The", "  ", "\n", "\t", "1", "23", "456", "7890", "é", "ß", "中", "文",
          "🎉", "<|im_start|>", "<|im_end|>", "'s", "'ll", "!", "?", ".", ",", "-", "_", "(", ")",
          " quick", " brown", "fox", "jumps", "über", "naïve", "\u0301", "ﬁ", "Ⅻ", "½", "\r\n"]
while len(corpus) < 300:
    corpus.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
tok_cases = []
for text in corpus:
    ids = tokenizer(text)["input_ids"]
    tok_cases.append({"text": text, "ids": [int(i) for i in ids], "decoded": tokenizer.decode(ids)})
write("tokenizer_corpus.json", {"cases": tok_cases})

# ---- chat templates ----------------------------------------------------------------
conversations = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? Ünïcödé 🎉"},
    ],
]
chat_cases = []
for conv in conversations:
    for gen in [True, False]:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        chat_cases.append({"messages": conv, "add_generation_prompt": gen, "rendered": text})
write("chat.json", {"cases": chat_cases})

print("wrote", os.path.abspath(OUT))
