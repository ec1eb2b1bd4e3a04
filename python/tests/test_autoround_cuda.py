"""AutoRound's sign-SGD tuning on CUDA (skipped without a CUDA device).

Imports nothing of TVM (and needs no conftest fixture), so it runs on the GPU machine, which has
torch but only TVM's runtime: ``python -m pytest --noconftest python/tests/test_autoround_cuda.py``.

* the fake quantizer and one forward / backward of a tiny random block: CUDA against the CPU;
* the whole tuning of the block on CUDA ends well below round-to-nearest, and near the CPU's result.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mlc_quant import autoround as ar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FMT = ar.WeightFormat(0, 15, False, 32)  # int4 asymmetric, groups of 32 (hidden 64: two per row)


def tiny_config():
    # what TorchBlock reads of a LlamaConfig (GQA: 4 query heads, 2 key/value heads)
    return SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None)


def block_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}
    params = {n: (rng.standard_normal(shapes[r]) * 0.1).astype(np.float32) for r, n in ar.block_linear_names(0).items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        params[f"model_layers_0_{norm}_weight"] = (1 + 0.3 * rng.standard_normal(h)).astype(np.float32)
    return params, rng


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in the CUDA matmuls: the comparison with the CPU is in float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_quantizer_and_gradients_cuda_match_cpu():
    cfg = tiny_config()
    params, rng = block_params(cfg)
    x = torch.from_numpy(rng.standard_normal((4, 32, cfg.hidden_size)).astype(np.float32))
    grads, outs = {}, {}
    for dev in ("cpu", "cuda"):
        block = ar.TorchBlock(cfg, params, 0, dev)
        wg = {r: ar.pad_groups_torch(block.weights[r], FMT.group_size) for r in block.names}
        # a non-trivial point: offsets and clipping away from their start
        g = torch.Generator().manual_seed(1)
        vs = {r: (torch.rand(w.shape, generator=g) - 0.5).to(dev).requires_grad_() for r, w in wg.items()}
        mins = {r: (0.8 + 0.2 * torch.rand(w.shape[:2], generator=g)).to(dev).requires_grad_() for r, w in wg.items()}
        maxs = {r: (0.8 + 0.2 * torch.rand(w.shape[:2], generator=g)).to(dev).requires_grad_() for r, w in wg.items()}
        fq = {r: ar.qdq_torch(w, FMT, vs[r], mins[r], maxs[r]).reshape(w.shape[0], -1) for r, w in wg.items()}
        out = block.forward(x.to(dev), fq, quant_act=True)
        loss = torch.nn.functional.mse_loss(out, block.forward(x.to(dev)))
        loss.backward()
        outs[dev] = (loss.item(), {r: w.detach().cpu() for r, w in fq.items()}, out.detach().cpu())
        grads[dev] = {r: (vs[r].grad.cpu(), mins[r].grad.cpu(), maxs[r].grad.cpu()) for r in wg}
    (l_cpu, fq_cpu, o_cpu), (l_gpu, fq_gpu, o_gpu) = outs["cpu"], outs["cuda"]
    for r in fq_cpu:  # the fake-quantized weights: the same grid points (rounding ties aside)
        assert (fq_cpu[r] != fq_gpu[r]).float().mean() < 1e-3, r
    torch.testing.assert_close(o_gpu, o_cpu, rtol=1e-4, atol=1e-4)
    assert abs(l_gpu - l_cpu) <= 1e-4 * l_cpu
    for r, per_role in grads["cpu"].items():
        for a, b in zip(per_role, grads["cuda"][r]):
            torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3 * float(a.abs().max()))
            big = a.abs() > 1e-2 * float(a.abs().max())  # SignSGD only sees signs: those must agree
            assert (torch.sign(a[big]) == torch.sign(b[big])).float().mean() > 0.99, r


def test_tuning_on_cuda_drops_the_loss_like_the_cpu():
    cfg = tiny_config()
    params, rng = block_params(cfg, seed=2)
    inputs = ar.ActStore((16, 32, cfg.hidden_size))
    inputs.array[:] = rng.standard_normal(inputs.shape)
    preset = ar.get_preset("fast", iters=60, batch_size=4)
    mse = {}
    for dev in ("cpu", "cuda"):
        block = ar.TorchBlock(cfg, params, 0, dev)
        targets = ar.ActStore(inputs.shape)
        ar._forward_store(block, inputs, targets, 8)
        result, stats = ar.tune_block(block, inputs, targets, FMT, preset, seed=0)
        ks = {r: block.weights[r].shape[1] for r in block.names}

        def block_mse(qres, block=block, targets=targets, ks=ks, dev=dev):
            w = {r: ar._dequant_torch(*qres[n], ks[r], dev) for r, n in block.names.items()}
            return ar._forward_store(block, inputs, None, 8, w, True, targets)

        rtn = {n: FMT.quantize_np(params[n]) for n in block.names.values()}
        mse[dev] = block_mse(rtn), block_mse(result), stats
        for q, s, z in result.values():
            assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape
    (rtn_c, ar_c, st_c), (rtn_g, ar_g, st_g) = mse["cpu"], mse["cuda"]
    assert abs(rtn_g - rtn_c) <= 1e-4 * rtn_c  # the same start
    assert abs(st_g["first_batch_loss_rtn"] - st_c["first_batch_loss_rtn"]) <= 1e-4 * st_c["first_batch_loss_rtn"]
    assert st_g["best_iter"] > 0 and ar_g < 0.8 * rtn_g, (ar_g, rtn_g)
    # sign-SGD may take other turns where a gradient is ~0, so not bit-equal: within 15% of the CPU's
    assert abs(ar_g - ar_c) <= 0.15 * ar_c, (ar_g, ar_c)


def test_run_autoround_gpu_resident_activations_equal_host_ones(tmp_path, monkeypatch):
    """run_autoround keeps the block activations on the GPU when they fit: the same result as with
    them in host memory (copied to the GPU batch by batch)."""
    cfg = tiny_config()
    cfg.num_hidden_layers, cfg.vocab_size = 2, 97
    cfg.to_dict = lambda: {k: v for k, v in vars(cfg).items() if k != "to_dict"}
    params, rng = block_params(cfg, seed=3)
    params.update({k.replace("layers_0", "layers_1"): v for k, v in block_params(cfg, seed=4)[0].items()})
    params["model_embed_tokens_weight"] = rng.standard_normal((cfg.vocab_size, cfg.hidden_size)).astype(np.float32)
    samples = [rng.integers(0, cfg.vocab_size, 48) for _ in range(8)]
    preset = ar.get_preset("fast", iters=10, nsamples=8, seqlen=48, batch_size=4)
    got = {}
    for where in ("gpu", "host"):
        if where == "host":  # no free GPU memory as far as run_autoround can tell
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 0))
        got[where] = ar.run_autoround(cfg, params, samples, FMT, preset, tmp_path / where, device="cuda",
                                      keep_checkpoints=False)
    assert sorted(got["gpu"]) == sorted(got["host"])
    # the same inputs reach the same kernels; only a nondeterministic CUDA backward (attention) could
    # flip a sign where a gradient is ~0, so: (almost) every code equal
    for name, (q, scale, zp) in got["gpu"].items():
        q2, scale2, zp2 = got["host"][name]
        assert (q == q2).mean() > 0.98 and (zp == zp2).mean() > 0.98, name
        np.testing.assert_allclose(scale, scale2, rtol=0.05)
