"""Weights in cosmicai's own names (state dicts, safetensors), and refusal of pickles that carry code.

Fidelity to the authors' checkpoint is tested against an oracle of their code in tests/test_model_fidelity.py."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from cosmicai.errors import ModelError, UnsafePickleError
from cosmicai.models.astromae.checkpoint import state_from_bytes
from cosmicai.models.registry import load_model

torch.set_num_threads(1)


def _inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 5, 32, 32)).astype(np.float32), rng.normal(18, 1, (n, 5)).astype(np.float32)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"model": _Evil(marker)}, buf)
    with pytest.raises(UnsafePickleError, match=r"(posix|os|nt)\.system"):
        state_from_bytes(buf.getvalue(), "evil.pt")
    assert not marker.exists()
    # an allowed-looking module path with a class that is not on the allow-list is refused as well
    with pytest.raises(UnsafePickleError, match="refusing"):
        state_from_bytes(_pickle_with_global("blocks.photoz", "Evil"), "evil2.pt")


def _ops(payload: bytes) -> list[tuple[str, object]]:
    import pickletools

    return [(op.name, arg) for op, arg, _ in pickletools.genops(payload)]


def _pickle_with_global(module: str, name: str) -> bytes:
    """A torch.save-style zip whose data.pkl only makes an instance of ``module.name``."""
    import zipfile

    payload = (pickle.PROTO + bytes([2]) + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.EMPTY_TUPLE
               + pickle.NEWOBJ + pickle.STOP)
    # a well-formed pickle that names the global (so a refusal is for the global, not for a broken stream) ...
    assert _ops(payload) == [("PROTO", 2), ("GLOBAL", f"{module} {name}"), ("EMPTY_TUPLE", None),
                             ("NEWOBJ", None), ("STOP", None)]
    # ... in the protocol torch.save writes
    real = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, real)
    with zipfile.ZipFile(real) as zf:
        assert _ops(zf.read("archive/data.pkl"))[0] == ("PROTO", 2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_plain_state_dicts_are_accepted(tmp_path):
    from safetensors.torch import save_file

    from cosmicai.models.astromae.network import build_astromae

    net = build_astromae(seed=5)
    images, mags = _inputs(3)
    with torch.no_grad():
        want = net(torch.from_numpy(images), torch.from_numpy(mags)).numpy()
    pt = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, pt)  # DataParallel-style keys
    st = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, st)
    for path in (pt, st):
        got = load_model("astromae", weights=str(path), threads=1).predict(images, mags)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_weights_with_missing_or_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    from cosmicai.models.astromae.network import build_astromae

    state = {k: v.contiguous() for k, v in build_astromae(seed=1).state_dict().items()}
    del state["fusion.2.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(ModelError, match=r"1 missing tensor\(s\): fusion\.2\.bias; 1 unexpected tensor\(s\) "
                                         r"\(no such name in the cosmicai AstroMAE\): extra\.weight"):
        load_model("astromae", weights=str(path))
    state["fusion.2.bias"] = torch.zeros(1)
    del state["extra.weight"]
    state["head.weight"] = torch.zeros(10, 10)
    save_file(state, path)
    with pytest.raises(ModelError, match=r"wrong shape: head\.weight \(10, 10\) \(expected \(192, 192\)\)"):
        load_model("astromae", weights=str(path))
