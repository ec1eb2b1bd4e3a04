#!/usr/bin/env python3
"""Write a random Llama checkpoint (HF folder: config.json, model.safetensors, byte-level tokenizer).

For showing the layer-streamed build on a model larger than the memory it runs in
(docs/design.md, "Layer-streamed calibration"): the weights are generated and written one tensor
at a time, so this script itself needs about one tensor of memory, whatever ``--layers``.

    python scripts/make_random_model.py --out out/rand-2048x32 --hidden 2048 --intermediate 5632 \\
        --layers 32 --heads 32 --kv-heads 8

Weights: normal(0, 0.02) (the HF initializer), RMSNorm weights 1 + normal(0, 0.1); stored in
``--dtype`` (float16 by default; the build converts to float32). Deterministic per ``--seed``.
"""
import argparse
import json
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlc_quant import artifact  # noqa: E402


def hf_config(a) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": a.dtype,
    }


def tensor_specs(a):
    hd = a.hidden // a.heads
    h, i, kv = a.hidden, a.intermediate, a.kv_heads * hd
    specs = [("model.embed_tokens.weight", (a.vocab, h))]
    for layer in range(a.layers):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; must not hold a model already)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.hidden % a.heads or a.heads % a.kv_heads or min(a.hidden, a.intermediate, a.layers, a.vocab) < 1:
        p.error("need positive sizes, hidden divisible by heads, heads by kv-heads")
    if a.vocab < 256:
        p.error("--vocab must be at least 256 (the byte-level tokenizer's 256 tokens)")
    if os.path.exists(os.path.join(a.out, "model.safetensors")):
        p.error(f"{a.out} already holds a model.safetensors")
    os.makedirs(a.out, exist_ok=True)
    dtype = np.dtype(a.dtype)
    specs = tensor_specs(a)

    def read(name):
        shape = dict(specs)[name]
        rng = np.random.default_rng([a.seed, zlib.crc32(name.encode())])
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    artifact.save_safetensors_streamed(os.path.join(a.out, "model.safetensors"),
                                       [(n, dtype, s) for n, s in specs], read, metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(a), f, indent=2)
    _byte_tokenizer().save_pretrained(a.out)
    n = sum(int(np.prod(s)) for _, s in specs)
    print(f"wrote {a.out}: {n / 1e6:.0f}M params, {n * dtype.itemsize / 2**30:.2f} GiB on disk, "
          f"{n * 4 / 2**30:.2f} GiB as float32")
    return 0


def _byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 tokens; ids above 255 are never produced)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


if __name__ == "__main__":
    sys.exit(main())
