"""Llama-family decoder (Llama, Mistral, Qwen2) in `tvm.relax.frontend.nn`.

The module tree mirrors transformers' (`model.layers.N.self_attn.q_proj`, ...), so a
parameter's nn name *is* its Hugging Face name. Every projection is its own `nn.Linear`
(IR: `matmul(x, permute_dims(w))`): smoothing and statistics are per linear, so q/k/v and
gate/up are deliberately not fused. RoPE and attention run inside TVM's paged KV cache.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.ir import IRModule
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from .config import LlamaConfig
from .flash_prefill import FlashPrefillKVCache, resolve_prefill_attention
from .fast_decode import with_fast_decode

# pylint: disable=missing-function-docstring,too-few-public-methods


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        q = op.reshape(self.q_proj(x), (b, s, self.num_heads, hd))
        k = op.reshape(self.k_proj(x), (b, s, self.num_kv_heads, hd))
        v = op.reshape(self.v_proj(x), (b, s, self.num_kv_heads, hd))
        # The KV cache API takes q/k/v stacked on the head axis; it applies RoPE to q and k,
        # appends k/v to the cache and attends (causal, GQA) in one call.
        qkv = op.concat([q, k, v], dim=2)
        out = kv_cache.attention_with_fused_qkv(layer_id, qkv, self.num_heads, sm_scale=hd**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * hd)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, input_ids: Tensor, kv_cache: PagedKVCache) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):  # pylint: disable=too-many-instance-attributes
    """Decoder + LM head. Methods exported: prefill, decode, create_paged_kv_cache."""

    def __init__(self, cfg: LlamaConfig, dtype: str = "float32", target: str | Target = "llvm",
                 prefill_attention: str | None = None):
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype = dtype
        # The KV cache picks its attention kernels (CPU or GPU TIR) from the target.
        self.target = Target(target) if isinstance(target, (str, dict)) else target
        # Ragged prefill attention: "flash" = mlc_quant's tensor-core kernel (CUDA fp16, head_dim
        # 64/128; model/flash_prefill.py), "tir" = TVM's. None: $MLC_QUANT_PREFILL_ATTENTION or auto.
        self.prefill_attention = resolve_prefill_attention(
            prefill_attention, self.target, dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        self.to(dtype)

    def _logits(self, hidden: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            # Same IR shape as an nn.Linear whose weight is the embedding table.
            w = op.permute_dims(self.model.embed_tokens.weight)
            logits = op.matmul(hidden, w)
        else:
            logits = self.lm_head(hidden)
        return logits if logits.dtype == "float32" else logits.astype("float32")

    def prefill(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        """Logits of every position (perplexity needs them all), [1, n, vocab] float32."""
        return self._logits(self.model(input_ids, paged_kv_cache)), paged_kv_cache

    def decode(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_ids, paged_kv_cache)), paged_kv_cache

    def create_paged_kv_cache(  # pylint: disable=too-many-arguments
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
    ) -> PagedKVCache:
        cfg = self.config
        # fast_decode.py: the decode slot rides on the flash prefill cache ($MLC_QUANT_DECODE_ATTENTION)
        cache_cls = with_fast_decode(FlashPrefillKVCache) if self.prefill_attention == "flash" else TIRPagedKVCache
        return cache_cls(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling or {},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        # "plain" params: weights become function parameters after the inputs, in
        # named_parameters() order (see export_model).
        run = {"param_mode": "plain", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "paged_kv_cache": kv,
                "$": run,
            },
            "decode": {
                "input_ids": nn.spec.Tensor([1, 1], "int32"),
                "paged_kv_cache": kv,
                "$": run,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


# Functions that run the model, and their number of leading non-weight inputs.
MODEL_FUNCTIONS = {"prefill": 2, "decode": 2}


def ir_param_name(hf_name: str) -> str:
    """IR (relax.Var) name of a weight: its HF name made an identifier.

    nn's exporter keeps the dotted attribute path as the Var name, but TVMScript prints it
    with underscores; we rename the Vars so the printed IR, the params dict and the
    stats all use the same, parseable name.
    """
    return hf_name.replace(".", "_")


def export_model(
    config: LlamaConfig, dtype: str = "float32", target: str | Target = "llvm",
    prefill_attention: str | None = None,
) -> tuple[IRModule, list[str]]:
    """Export the model to Relax.

    Returns the IRModule (weights are parameters of `prefill`/`decode` after their
    `num_input` inputs) and the weights' relax.Var names in that parameter order.
    `prefill_attention`: "auto" (default), "flash" or "tir", see model/flash_prefill.py.
    """
    model = LlamaForCausalLM(config, dtype=dtype, target=target, prefill_attention=prefill_attention)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    names = [ir_param_name(name) for name, _ in named_params]
    for fn, n_in in MODEL_FUNCTIONS.items():
        func = _rename_weights(mod[fn], n_in)
        # The Engine passes one weight list to every function: the order must agree.
        if [p.name for p in func.params[n_in:]] != names:
            raise AssertionError(f"{fn}: weight parameters do not follow named_parameters()")
        mod[fn] = func
    return mod, names


def _rename_weights(func: relax.Function, num_input: int) -> relax.Function:
    old = list(func.params[num_input:])
    new = [relax.Var(ir_param_name(v.name), v.ty) for v in old]
    body = func.bind_params(dict(zip(old, new))).body
    return relax.Function(
        list(func.params[:num_input]) + new, body, func.ret_ty, func.is_pure, func.attrs
    )


def param_name_map(config: LlamaConfig) -> dict[str, str]:
    """IR name -> Hugging Face name of every weight, in IR parameter order."""
    model = LlamaForCausalLM(config)
    return {ir_param_name(name): name for name, _ in model.named_parameters()}


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """IR name -> shape of every weight the exported model expects, in parameter order."""
    model = LlamaForCausalLM(config)
    return {
        ir_param_name(name): tuple(int(d) for d in p.shape)
        for name, p in model.named_parameters()
    }
