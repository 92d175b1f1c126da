"""AstroMAE against the authors' own network: their checkpoint imports by name and reproduces their forward.

The oracle (tests/astromae_original/) is a module tree with the authors' module paths, class and attribute
names, written afresh from their code (github mstaylor/AI-for-Astronomy @100bcdc, encoder config @83ab650) and
from timm 0.4.12's ViT parts. It runs in a subprocess, so its ``blocks`` and ``timm`` never enter this process:
the importer reads their pickles without those classes, as it must on a user's machine.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmicai.errors import ModelError
from cosmicai.models.astromae.checkpoint import read_checkpoint
from cosmicai.models.registry import load_model

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "astromae-original" / "layout.txt"
TOL = 1e-5  # the issue's bound on max |dz| against the authors' forward, exact mode


@pytest.fixture
def authors(authors_checkpoints) -> Path:
    return authors_checkpoints


@pytest.fixture
def imported(authors_weights) -> Path:
    return authors_weights


def _oracle_forward(authors: Path):
    f = np.load(authors / "forward.npz")
    return f["images"], f["magnitudes"], f["z"]


def _max_dz(z, want):
    return float(np.max(np.abs(np.asarray(z, np.float64) - want) / (1 + want)))


def _globals(pickle_bytes: bytes) -> set[str]:
    """Every global a protocol-2 pickle references (read by opcode; nothing is executed)."""
    names = set()
    for op, arg, _ in pickletools.genops(pickle_bytes):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
    return names


@pytest.mark.skipif(not LAYOUT.is_file(), reason=f"the authors' layout listing ({LAYOUT}) is not on this machine")
def test_oracle_builds_what_the_authors_construction_yields(authors):
    """The oracle's state dict (keys, shapes, order) and pickle globals equal the published listing."""
    text = LAYOUT.read_text()
    listed = [tuple(line.split("\t")) for line in text.split("## module tree")[0].splitlines()
              if line.startswith("module.")]
    state = torch.load(authors / "state_module.pt", weights_only=True)
    ours = [(k, str(tuple(v.shape))) for k, v in state.items()]
    assert len(ours) == len(listed) == 388
    assert ours == listed
    expected_globals = set(text.split("## pickle globals referenced by the saved checkpoint")[1].split())
    with zipfile.ZipFile(authors / "whole_cpu.pt") as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert _globals(pkl) == expected_globals


def test_cli_import_names_what_it_dropped(authors, tmp_path, capsys):
    from cosmicai.cli import main

    out = tmp_path / "w.safetensors"
    assert main(["model", "import-cai", str(authors / "whole_cpu.pt"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "read 372 tensor(s) in the authors naming" in said
    assert "2 tensor(s) inception_model.vis_inception.0.weight, inception_model.vis_inception.0.bias" in said
    assert "14 tensor(s) inception_model.vis_inception.8.branch3.0.conv.weight" in said
    assert "skipped by its forward" in said and "one module under both names" in said
    meta = json.loads(json.dumps(read_checkpoint(out.read_bytes(), "w")[2].__dict__))
    assert meta["scheme"] == "cosmicai" and meta["dropped"] == {}  # the written file is in our names


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_imported_checkpoint_reproduces_the_authors_forward(authors, imported, engine):
    images, mags, want = _oracle_forward(authors)
    assert want.std() > 0.1  # a meaningful comparison: outputs vary row to row
    pred = load_model("astromae", weights=str(imported), mode="exact", engine=engine, threads=1)
    assert pred.engine == engine
    got = pred.predict(images, mags.astype(np.float32))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert _max_dz(got, want) <= TOL


@pytest.mark.parametrize("name", ["whole_gpu", "whole_sequential", "state_module", "state_plain"])
def test_every_way_of_saving_imports_to_the_same_tensors(authors, imported, name):
    """GPU-tagged storages, encoder blocks in a Sequential, a state dict with or without ``module.``."""
    want, _, _ = read_checkpoint(imported.read_bytes(), "imported")
    got, _, report = read_checkpoint((authors / f"{name}.pt").read_bytes(), name)
    assert report.scheme == "authors" and len(report.dropped) == 16
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_pickled_checkpoint_loads_directly(authors):
    images, mags, want = _oracle_forward(authors)
    pred = load_model("astromae", weights=str(authors / "whole_cpu.pt"), engine="torch", threads=1)
    assert _max_dz(pred.predict(images[:8], mags[:8].astype(np.float32)), want[:8]) <= TOL


def test_shallower_encoder_is_refused_naming_the_missing_blocks(authors):
    with pytest.raises(ModelError) as err:
        read_checkpoint((authors / "depth6.pt").read_bytes(), "depth6.pt")
    msg = str(err.value)
    assert msg.startswith("depth6.pt: checkpoint does not fit AstroMAE (read in the authors' ViT_Astro names)")
    assert "72 missing tensor(s): ViT block(s) 6, 7, 8, 9, 10, 11" in msg
    assert "AstroMAE has 12 blocks" in msg and "\n" not in msg


def _state(authors: Path) -> dict[str, torch.Tensor]:
    return torch.load(authors / "state_plain.pt", weights_only=True)


def _save(state: dict, path: Path) -> bytes:
    torch.save(state, path)
    return path.read_bytes()


def test_mapping_is_by_name_never_by_order(authors, imported, tmp_path):
    state = _state(authors)
    shuffled = dict(reversed(list(state.items())))
    got, _, _ = read_checkpoint(_save(shuffled, tmp_path / "r.pt"), "reversed.pt")
    want, _, _ = read_checkpoint(imported.read_bytes(), "imported")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_same_shape_tensors_under_foreign_names_are_refused(authors, tmp_path):
    """The ViT MLP and Inception MLP have the same shapes. Under names the importer does not know, in swapped
    order, pairing by order or shape would load each into the other's place; by name it refuses and names them."""
    state = _state(authors)
    swapped = {}
    for k, v in state.items():
        if k.startswith("vit_block."):
            continue
        if k.startswith("inception_model.vis_inception.1") and k.split(".")[2] in ("10", "12"):
            swapped[k.replace("inception_model.vis_inception.1", "mlp_b.")] = v
            continue
        swapped[k] = v
    for k, v in state.items():
        if k.startswith("vit_block."):
            swapped[k.replace("vit_block.", "mlp_a.")] = v
    with pytest.raises(ModelError) as err:
        read_checkpoint(_save(swapped, tmp_path / "s.pt"), "swapped.pt")
    msg = str(err.value)
    assert "8 missing tensor(s): vit_block.0.weight" in msg and "inception_model.vis_inception.10.weight" in msg
    assert "8 unexpected tensor(s)" in msg and "mlp_a.0.weight" in msg and "mlp_b.0.weight" in msg


def test_wrong_shape_and_diverging_duplicate_are_refused(authors, tmp_path):
    state = _state(authors)
    bad = dict(state)
    bad["concat_block.0.weight"] = torch.zeros(1024, 3000)
    with pytest.raises(ModelError, match=r"1 tensor\(s\) with the wrong shape: concat_block\.0\.weight \(1024, 3000\) "
                                         r"\(expected \(1024, 3216\)\)"):
        read_checkpoint(_save(bad, tmp_path / "b.pt"), "b.pt")
    dup = dict(state)
    dup["inception_model.vis_inception.0.weight"] = dup["inception_model.vis_inception.0.weight"] + 1
    with pytest.raises(ModelError, match="vis_inception.0.weight differs from inception_model.conv2d_init.weight"):
        read_checkpoint(_save(dup, tmp_path / "d.pt"), "d.pt")
    mixed = dict(state)
    mixed["fusion.0.weight"] = mixed.pop("concat_block.0.weight")  # one of ours among the authors' names
    with pytest.raises(ModelError, match=r"1 missing tensor\(s\): concat_block\.0\.weight; 1 unexpected tensor\(s\) "
                                         r"\(no such name in the authors AstroMAE\): fusion\.0\.weight"):
        read_checkpoint(_save(mixed, tmp_path / "m.pt"), "m.pt")


@pytest.mark.parametrize("kind", ["empty", "truncated", "legacy", "raw-pickle", "not-a-checkpoint",
                                  "truncated-safetensors"])
def test_damaged_checkpoints_say_what_the_file_is(authors, imported, tmp_path, kind):
    marker = tmp_path / "ran"
    if kind == "empty":
        data, expect = b"", "the file is empty (0 bytes), not a checkpoint"
    elif kind == "truncated":
        whole = (authors / "whole_cpu.pt").read_bytes()
        data, expect = whole[: len(whole) // 2], "a damaged or truncated torch checkpoint"
    elif kind == "legacy":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
        data, expect = buf.getvalue(), "a legacy (torch < 1.6, non-zip) checkpoint"
    elif kind == "raw-pickle":
        data = pickle.dumps(_Touch(str(marker)))
        expect = "a raw Python pickle, not a torch checkpoint or safetensors weights; refused unread"
    elif kind == "not-a-checkpoint":
        data, expect = b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "not a checkpoint: neither safetensors"
    else:
        whole = imported.read_bytes()
        data, expect = whole[:200], "truncated safetensors file"
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    with pytest.raises(ModelError) as err:
        load_model("astromae", weights=str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: {expect}") and "\n" not in msg
    assert any(word in msg for word in ("fetch it again", "import-cai", "re-save"))  # says what to do
    assert not marker.exists()


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))
