"""mlc_quant.compare: next-token choices of a build, checked against the engine's own perplexity
and a numpy argmax / top-2 of its logits, on a tiny random Llama built for the CPU."""
import shutil

import numpy as np
import pytest

from mlc_quant import artifact
from mlc_quant.cli import main as cli
from mlc_quant.compare import EMBED, first_difference, greedy_tokens, teacher_forced, ulp_nudged, window_choices


@pytest.fixture(scope="module")
def engine_and_params(tiny_llama_dir, tmp_path_factory):
    from test_build import byte_tokenizer  # pylint: disable=import-outside-toplevel

    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    model = tmp_path_factory.mktemp("m") / "model"
    shutil.copytree(tiny_llama_dir, model)
    byte_tokenizer(256).save_pretrained(model)
    out = tmp_path_factory.mktemp("b") / "q0f32"
    # q0f32 calibrates nothing: the default --calib-seq-len (512 > this model's 256) is not refused
    assert cli(["build", "--model", str(model), "--quantization", "q0f32", "--max-seq-len", "64",
                "--output", str(out)]) == 0
    engine, _, _ = load_built(out)
    return engine, dict(artifact.load_safetensors(out / artifact.PARAMS_FILE)), out


def test_window_choices_match_engine_and_numpy(engine_and_params):
    engine, _, _ = engine_and_params
    ids = np.random.default_rng().integers(0, 256, size=3 * 16 + 5)  # 3 windows, a dropped tail
    ppl, argmax, margins = window_choices(engine, ids, 16)
    assert ppl == pytest.approx(engine.perplexity(ids, 16), rel=1e-9)
    assert len(argmax) == len(margins) == 3 * 15
    for w in range(3):
        engine.reset()
        logits = np.asarray(engine.prefill(ids[w * 16:(w + 1) * 16]), np.float64)[:-1]
        top = np.sort(logits, axis=-1)
        assert argmax[w * 15:(w + 1) * 15] == np.argmax(logits, axis=-1).tolist()
        np.testing.assert_allclose(margins[w * 15:(w + 1) * 15], top[:, -1] - top[:, -2], rtol=0, atol=1e-12)


def test_greedy_and_teacher_forced_agree_with_themselves(engine_and_params):
    engine, _, _ = engine_and_params
    prompt = [5, 17, 33, 101]
    path = greedy_tokens(engine, prompt, 6)
    forced, margins = teacher_forced(engine, prompt, path)
    assert forced == path and all(m >= 0 for m in margins)  # fed its own path, it picks it again
    assert first_difference(path, path) == 6 and first_difference([1, 2, 3], [1, 9, 3]) == 1


def test_ulp_nudged_moves_every_value_by_one_ulp(engine_and_params):
    _, params, _ = engine_and_params
    nudged = ulp_nudged(params)
    emb, new = params[EMBED], nudged[EMBED]
    assert new.dtype == emb.dtype and np.all(new > emb)
    assert np.all(new - emb <= np.abs(np.spacing(emb)))  # at most one ulp up ...
    np.testing.assert_array_equal(np.nextafter(new, -np.inf).astype(emb.dtype), emb)  # ... and no float between
    assert all(nudged[k] is params[k] for k in params if k != EMBED)
    with pytest.raises(KeyError, match="not a param of this build"):
        ulp_nudged(params, "no_such_param")
