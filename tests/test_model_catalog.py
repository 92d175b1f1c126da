"""One door for models: ``register_model`` (call or decorator), entry points through the same table, the shipped
models registered like any plug-in, and the per-process ``WorkerModels``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cosmicai.errors import ModelError
from cosmicai.models import available_models, register_model
from cosmicai.models.astromae import demo_weights_path
from cosmicai.models.catalog import _TABLE, find_spec
from cosmicai.models.registry import load_model, weights_sha256
from cosmicai.models.worker import WorkerModels


class _Half:
    n_params = 0

    def predict(self, images, magnitudes, batch_size=512):
        return magnitudes[:, 0] / 2


@pytest.fixture
def scratch_names():
    before = dict(_TABLE)
    yield
    _TABLE.clear()
    _TABLE.update(before)


def _inputs(n: int):
    r = np.random.default_rng(0)
    return r.gamma(2.0, 0.05, (n, 5, 32, 32)).astype(np.float32), r.uniform(15, 23, (n, 5)).astype(np.float32)


def test_register_model_as_call_and_as_decorator(scratch_names):
    seen = {}

    @register_model("half-mag", card={"trained_on": "nothing", "caveat": "a test model"})
    def half(weights=None, device="cpu", mode="exact", threads=None):
        seen.update(weights=weights, device=device, mode=mode, threads=threads)
        return _Half()

    register_model("half-again", half)
    assert available_models()[:3] == ["astromae-demo", "astromae", "astromae-random"]
    assert available_models()[-2:] == ["half-mag", "half-again"]
    images, mags = _inputs(3)
    pred = load_model("half-mag", threads=1)
    np.testing.assert_allclose(pred.predict(images, mags), mags[:, 0] / 2, rtol=1e-6)
    assert seen == {"weights": None, "device": "cpu", "mode": "exact", "threads": 1}
    assert (pred.name, pred.engine, pred.card["caveat"], pred.card["model"]) == ("half-mag", "plugin", "a test model",
                                                                                 "half-mag")
    assert load_model("half-again", threads=1).card["caveat"] is None  # its own registration, its own card
    with pytest.raises(ModelError, match="model name 'a:b' must be a non-empty string without ':'"):
        register_model("a:b", half)


def test_unknown_name_is_one_line_listing_every_name(scratch_names):
    register_model("half-mag", _Half)
    with pytest.raises(ModelError) as info:
        load_model("gpt-9")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("model 'gpt-9' is not known; choose one of astromae-demo, astromae, astromae-random, half-mag "
                       "or give 'package.module:factory'")


def test_shipped_models_are_plain_registrations_a_plugin_can_repeat(scratch_names):
    demo = find_spec("astromae-demo")
    assert demo.factory == "cosmicai.models.astromae.load:load_demo" and demo.weights == demo_weights_path()
    assert find_spec("astromae-random").reads_weights is False
    # The same data under other names: nothing in the loader depends on the shipped names.
    register_model("my-random", "cosmicai.models.astromae.load:load_random", reads_weights=False,
                   engines=("torch", "onnxruntime"), card={"origin": "mine", "trained_on": "nothing"})
    register_model("my-demo", "cosmicai.models.astromae.load:load_weights", weights=demo_weights_path(),
                   engines=("torch",), weights_origin="my shipped weights")
    mine = load_model("my-random", threads=1, engine="torch")
    assert (mine.name, mine.card["origin"], mine.card["model"]) == ("my-random", "mine", "my-random")
    assert weights_sha256("my-random", "/nonexistent") is None
    assert weights_sha256("my-demo", None) == weights_sha256("astromae-demo", None)
    pred = load_model("my-demo", threads=1)
    assert pred.engine == "torch"  # registered without ONNX Runtime: auto picks torch on CPU
    assert pred.card["origin"] == "my shipped weights" and pred.card["model"] == "my-demo"
    with pytest.raises(ModelError, match="engine 'onnxruntime' runs AstroMAE on CPU only .*my-demo on cpu"):
        load_model("my-demo", threads=1, engine="onnxruntime")
    images, mags = _inputs(4)
    np.testing.assert_allclose(pred.predict(images, mags), load_model("astromae-demo", threads=1,
                                                                      engine="torch").predict(images, mags), atol=0)


def test_entry_point_plugins_resolve_through_the_same_table(tmp_path, scratch_names):
    pkg = tmp_path / "cai_ep_plugin.py"
    pkg.write_text("class Third:\n    n_params = 3\n    def predict(self, images, magnitudes, batch_size=512):\n"
                   "        return magnitudes[:, 1]\n\ndef factory(**kw):\n    return Third()\n")
    dist = tmp_path / "cai_ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cai-ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cosmicai.models]\nthird-mag = cai_ep_plugin:factory\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert "third-mag" in available_models() and find_spec("third-mag") is None  # listed, not imported yet
        images, mags = _inputs(2)
        pred = load_model("third-mag", threads=1)
        np.testing.assert_allclose(pred.predict(images, mags), mags[:, 1])
        assert find_spec("third-mag").factory == "cai_ep_plugin:factory" and pred.n_params == 3
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cai_ep_plugin", None)


def test_worker_models_loads_once_per_key_and_forgets_on_clear(scratch_names):
    calls = []

    @register_model("counted")
    def counted(**kw):
        calls.append(kw["threads"])
        return _Half()

    models = WorkerModels()
    models.configure(threads=2)
    first, loaded, _ = models.get("counted", None, "cpu", "exact")
    again, loaded_again, seconds = models.get("counted", None, "cpu", "exact")
    assert loaded and not loaded_again and again is first and seconds == 0.0 and calls == [2]
    models.get("counted", None, "cpu", "exact", threads=1)  # another thread count is another model
    assert calls == [2, 1] and models.threads_in_use(first) == 2
    models.keep_fast_check(("k",), "check")
    models.drop("counted", None, "cpu", "exact")
    models.get("counted", None, "cpu", "exact")
    assert calls == [2, 1, 2] and models.fast_check(("k",)) == "check"
    models.clear()
    assert models.fast_check(("k",)) is None
    models.get("counted", None, "cpu", "exact")
    assert calls == [2, 1, 2, 2]


def test_the_model_layer_imports_no_config_pipeline_or_torch():
    code = textwrap.dedent("""
        import sys
        import cosmicai.models, cosmicai.models.catalog, cosmicai.models.worker, cosmicai.models.modes
        import cosmicai.models.guard
        from cosmicai.models import available_models
        from cosmicai.models.registry import weights_sha256
        assert available_models()[:3] == ["astromae-demo", "astromae", "astromae-random"]
        assert weights_sha256("astromae-random", None) is None
        bad = sorted(m for m in sys.modules if m.startswith(("cosmicai.config", "cosmicai.pipeline", "torch")))
        print(",".join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
