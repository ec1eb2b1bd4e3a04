#!/usr/bin/env python3
"""Does the compiled W8A8 build compute what scripts/rotation_diagnose.py's torch mirror computes?

    python scripts/rotation_mirror_check.py

On the test suite's tiny random GQA Llama (2 layers), for rotations none / r1r2 / r1r2r4: the
max |logit| difference (relative to the float logits' max) of the compiled q0f32 build vs the
float mirror and of the compiled smq_q8i8f16_3 (no smoothing) vs the fake-quant mirror, on 64
random tokens. Prints one line per rotation.
"""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE, os.path.join(HERE, "..", "python", "tests")]
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import make_hf_model, save_hf_model  # noqa: E402
from test_build import byte_tokenizer  # noqa: E402
from rotation_diagnose import Mirror, parse_set  # noqa: E402
from mlc_quant import rotation  # noqa: E402
from mlc_quant.build import BuildOptions, build_model  # noqa: E402
from mlc_quant.model.loader import load_config, load_params_dict  # noqa: E402
from mlc_quant.runner import load_built  # noqa: E402
from mlc_quant.schemes import get_scheme  # noqa: E402
tmp = tempfile.mkdtemp()
model = save_hf_model(make_hf_model("llama", tie_word_embeddings=False), os.path.join(tmp, "m"))
byte_tokenizer(256).save_pretrained(model)
config = load_config(model)
ids = np.random.default_rng(0).integers(0, 256, 64)
for rot_mode in ["none", "r1r2", "r1r2r4"]:
    res = {}
    for scheme_name in ["q0f32", "smq_q8i8f16_3"]:
        out = os.path.join(tmp, f"{scheme_name}-{rot_mode}")
        build_model(BuildOptions(model=model, quantization=scheme_name, output=out, smooth=False, max_seq_len=128, calib_seq_len=32,
                                 rotation=rot_mode))
        eng, _, _ = load_built(out, max_seq_len=128)
        eng.reset(); res[scheme_name] = eng.prefill(ids)
    params = rotation.rotate_params(load_params_dict(model, config, "float32"), config, rotation.Rotation(rot_mode))
    m = Mirror(config, params, rot_mode == "r1r2r4")
    sch = get_scheme("smq_q8i8f16_3")
    wq = {}
    for key in parse_set("all", config.num_hidden_layers):
        qp = sch.quantize_weight("w", m.w[key].numpy(), None)
        wq[key] = torch.from_numpy(qp["w.q"].astype(np.float32) * qp["w.scale"][:, None])
    t = torch.tensor(ids[None].astype(np.int64))
    mf = m.run(t, {}, set())[0].numpy(); mq = m.run(t, wq, parse_set("all", config.num_hidden_layers))[0].numpy()
    sc = np.abs(mf).max()
    print(f"{rot_mode}: float build-mirror {np.abs(res['q0f32']-mf).max()/sc:.2e}; W8A8 build-mirror {np.abs(res['smq_q8i8f16_3']-mq).max()/sc:.2e}; "
          f"W8A8 mirror-float {np.abs(mq-mf).max()/sc:.2e}; W8A8 build-float {np.abs(res['smq_q8i8f16_3']-mf).max()/sc:.2e}", flush=True)
shutil.rmtree(tmp, ignore_errors=True)
