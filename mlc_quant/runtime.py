"""Run a built model with the TVM runtime alone (no compiler, no Relax import).

The built module must export the functions of `mlc_quant.model.llama`:
`create_paged_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size) -> kv`,
`prefill(input_ids[1, n] int32, kv, *weights) -> (logits[1, n, V] f32, kv)` and
`decode(input_ids[1, 1] int32, kv, *weights) -> (logits[1, 1, V] f32, kv)`.
After `CollectStats` a function returns `((logits, kv), (stat_0, ...))` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tvm
import tvm.runtime.vm  # noqa: F401  (not imported by `import tvm` in runtime-only mode)
import tvm_ffi

NUM_INPUTS = 2  # input_ids, paged_kv_cache: weights follow them
RUN_FUNCTIONS = ("prefill", "decode")

StatsCallback = Callable[[str, list[np.ndarray]], None]


def load_vm(module, device: tvm.runtime.Device) -> tvm.runtime.vm.VirtualMachine:
    """A VirtualMachine from an Executable, a runtime Module, a path to an exported .so, or a VM."""
    if isinstance(module, tvm.runtime.vm.VirtualMachine):
        return module
    if isinstance(module, (str, os.PathLike)):
        path = os.fspath(module)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"compiled model library {path} not found")
        module = tvm.runtime.load_module(path)
    return tvm.runtime.vm.VirtualMachine(module, device)


class Engine:  # pylint: disable=too-many-instance-attributes
    """Batch-1 inference over one sequence held in a paged KV cache.

    params: the weights, either a list in the order the functions take them (after their
    two inputs), a mapping keyed by the functions' weight parameter names (relax.Var
    names), or an iterator of (name, array) such as `loader.load_params(...)` (streamed
    to the device). numpy arrays are copied to `device` once. None when weights are bound.
    stats_callback: for modules instrumented by CollectStats; called as
    `stats_callback(func_name, [np arrays])` after every prefill chunk and decode step.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        module,
        params: Sequence | Mapping | None = None,
        device: tvm.runtime.Device | None = None,
        *,
        max_seq_len: int = 2048,
        prefill_chunk_size: int | None = None,
        page_size: int = 16,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        stats_callback: StatsCallback | None = None,
    ):
        self.device = device if device is not None else tvm.cpu()
        self.vm = load_vm(module, self.device)
        self.max_seq_len = int(max_seq_len)
        self.prefill_chunk_size = int(prefill_chunk_size or min(self.max_seq_len, 2048))
        self.page_size = int(page_size)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stats_callback = stats_callback
        self._args = self._place_params(params)
        self.vocab_size = vocab_size or self._infer_vocab_size()
        self._funcs = {fn: self.vm[fn] for fn in RUN_FUNCTIONS}
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._clear = tvm.get_global_func("vm.builtin.kv_state_clear")
        self._add_seq = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self.kv_cache = self.vm["create_paged_kv_cache"](
            tvm_ffi.Shape([1]),
            tvm_ffi.Shape([self.max_seq_len]),
            tvm_ffi.Shape([self.prefill_chunk_size]),
            tvm_ffi.Shape([self.page_size]),
        )
        self.seq_len = 0
        self._add_seq(self.kv_cache, 0)

    # ------------------------------------------------------------------ setup

    def _weight_names(self, fn: str) -> list[str]:
        vm = self.vm
        arity = vm._get_function_arity(fn)  # pylint: disable=protected-access
        get_name = vm._get_function_param_name  # pylint: disable=protected-access
        return [get_name(fn, i) for i in range(NUM_INPUTS, arity)]

    def _place_params(self, params) -> dict[str, list]:
        """Device copies of the weights, per function; each weight is copied once."""
        names = {fn: self._weight_names(fn) for fn in RUN_FUNCTIONS}
        if params is not None and not isinstance(params, (Mapping, Sequence)):
            # A stream of (name, array), e.g. loader.load_params(): each array is placed on
            # the device as it comes, so the host never holds the whole model.
            params = {name: self._to_device(array) for name, array in params}
        if isinstance(params, Mapping):
            needed = dict.fromkeys(n for fn in RUN_FUNCTIONS for n in names[fn])
            missing = [n for n in needed if n not in params]
            if missing:
                raise ValueError(f"params lack {len(missing)} weights, e.g. {missing[:5]}")
            placed = {n: self._to_device(params[n]) for n in needed}
            return {fn: [placed[n] for n in names[fn]] for fn in RUN_FUNCTIONS}
        values = list(params or [])
        for fn in RUN_FUNCTIONS:
            if len(names[fn]) != len(values):
                raise ValueError(f"{fn} takes {len(names[fn])} weights, {len(values)} were given")
        placed_list = [self._to_device(v) for v in values]
        return {fn: placed_list for fn in RUN_FUNCTIONS}

    def _to_device(self, v):
        if isinstance(v, tvm.runtime.Tensor):
            return v if v.device == self.device else v.copyto(self.device)
        # (ascontiguousarray alone turns a 0-d array, e.g. a per-tensor scale, into shape [1])
        return tvm.runtime.tensor(np.ascontiguousarray(v).reshape(np.shape(v)), self.device)

    def _infer_vocab_size(self) -> int | None:
        # Output width of the LM head, from the weights the functions take by name.
        names = self._weight_names("prefill")
        for name in ("lm_head_weight", "model_embed_tokens_weight"):
            if name in names:
                return int(self._args["prefill"][names.index(name)].shape[0])
        return None

    # ------------------------------------------------------------------ forward

    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        self._clear(self.kv_cache)
        self._add_seq(self.kv_cache, 0)
        self.seq_len = 0

    def forward(self, fn: str, ids_dev, n: int):
        """One ``prefill`` / ``decode`` call of ``n`` tokens already on the device, with the KV
        cache's begin/end around it; returns the VM's output as it is (on the device). No
        bookkeeping of ``seq_len``: benchmarks and checks that drive the cache themselves."""
        self._begin(self.kv_cache, tvm_ffi.Shape([0]), tvm_ffi.Shape([n]))
        out = self._funcs[fn](ids_dev, self.kv_cache, *self._args[fn])
        self._end(self.kv_cache)
        return out

    def _run(self, fn: str, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        if self.seq_len + n > self.max_seq_len:
            raise ValueError(
                f"sequence would reach {self.seq_len + n} tokens, over max_seq_len="
                f"{self.max_seq_len}: reset() or create the Engine with a larger max_seq_len"
            )
        out = self.forward(fn, tvm.runtime.tensor(ids, self.device), n)
        self.seq_len += n
        if self.stats_callback is not None:
            out, stats = out[0], out[1]
            self.stats_callback(fn, [s.numpy() for s in stats])
        return out[0].numpy()

    def _check_ids(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens given")
        # The embedding gather runs unchecked: an out-of-range id would read out of bounds.
        hi = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int32).max
        if ids.min() < 0 or ids.max() >= hi:
            raise ValueError(f"token ids must lie in [0, {hi}), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int32)

    def prefill(self, tokens) -> np.ndarray:
        """Append tokens to the sequence; logits of every given position, [n, vocab] float32.

        Runs in chunks of at most `prefill_chunk_size` tokens (the KV cache's limit).
        """
        ids = self._check_ids(tokens)
        chunks = [
            self._run("prefill", ids[None, i : i + self.prefill_chunk_size])[0]
            for i in range(0, ids.size, self.prefill_chunk_size)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def decode(self, token: int) -> np.ndarray:
        """Append one token; its logits, [vocab] float32."""
        ids = self._check_ids([token])
        return self._run("decode", ids[None, :])[0, 0]

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield new token ids for a prompt (fresh sequence), stopping before an eos token.

        greedy: argmax; otherwise samples from softmax(logits / temperature).
        Stops after max_new_tokens, at eos (not yielded) or when the cache is full.
        """
        rng = np.random.default_rng(seed)
        self.reset()
        logits = self.prefill(prompt_ids)[-1]
        for i in range(max_new_tokens):
            token = _pick(logits, greedy, temperature, rng)
            if token in self.eos_token_ids:
                return
            yield token
            if i + 1 == max_new_tokens or self.seq_len >= self.max_seq_len:
                return
            logits = self.decode(token)

    # ------------------------------------------------------------------ evaluation

    def perplexity(self, token_ids, ctx: int) -> float:
        """exp(mean NLL) over non-overlapping windows of `ctx` tokens.

        The tokens are cut into windows [0, ctx), [ctx, 2 ctx), ...; a trailing window
        shorter than ctx is dropped (unless the text is shorter than one window, which then
        is the only window). Each window is prefilled into a fresh cache, and its tokens
        1..len-1 are scored given the window's earlier tokens: NLL_t = -log softmax(z_{t-1})[x_t].
        The result is exp(sum of all NLL / number of scored tokens), as in llama.cpp's
        perplexity tool (which however scores only the second half of each window).
        """
        ids = self._check_ids(token_ids)
        if ctx < 2:
            raise ValueError("ctx must be at least 2")
        if ctx > self.max_seq_len:
            raise ValueError(f"ctx={ctx} exceeds the engine's max_seq_len={self.max_seq_len}")
        n_windows = max(ids.size // ctx, 1)
        total, count = 0.0, 0
        for w in range(n_windows):
            window = ids[w * ctx : (w + 1) * ctx]
            if window.size < 2:
                break
            self.reset()
            logits = self.prefill(window)
            total += float(nll(logits[:-1], window[1:]).sum())
            count += window.size - 1
        self.reset()
        if count == 0:
            raise ValueError("perplexity needs at least 2 tokens")
        return math.exp(total / count)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, computed stably (float64 accumulation)."""
    z = logits.astype(np.float32, copy=False)
    m = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=-1, dtype=np.float64)) + m[:, 0]
    return lse - z[np.arange(len(targets)), targets]


def _pick(logits: np.ndarray, greedy: bool, temperature: float, rng) -> int:
    if greedy or temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(p.size, p=p / p.sum()))
