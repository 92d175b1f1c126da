"""Import of the original pickled AstroMAE checkpoint: faithful outputs, and refusal of anything else."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from cosmicai.errors import ModelError, UnsafePickleError
from cosmicai.models.convert import import_checkpoint, state_from_bytes
from cosmicai.models.registry import load_model

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# A stand-in for the original code base: classes with the original module paths and structure (timm 0.4.12
# ViT parts, blocks.photoz Inception CNN + magnitude MLP, blocks.model_vit_inception.ViT_Astro), written
# independently of cosmicai.models.astromae and with different attribute names outside the ViT.


def _register(module_name: str, *classes: type) -> None:
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    for cls in classes:
        cls.__module__ = module_name
        setattr(sys.modules[module_name], cls.__name__, cls)


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_size, self.patch_size, self.num_patches, self.flatten = (32, 32), (8, 8), 16, True
        self.proj = nn.Conv2d(5, 192, 8, 8)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(192, 768), nn.GELU(), nn.Linear(768, 192), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.scale = 3, 64 ** -0.5
        self.qkv, self.attn_drop = nn.Linear(192, 576, bias=True), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(192, 192), nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(192, eps=1e-6), Attention()
        self.drop_path, self.norm2, self.mlp = nn.Identity(), nn.LayerNorm(192, eps=1e-6), Mlp()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    def __init__(self, cin, cout, five=True):
        super().__init__()
        w = cout // (4 if five else 3)
        self.b1 = ConvBlock(cin, cout - w * (3 if five else 2), 1)
        self.b3 = nn.Sequential(ConvBlock(cin, w, 1), ConvBlock(w, w, 3))
        self.b5 = nn.Sequential(ConvBlock(cin, w, 1), ConvBlock(w, w, 5)) if five else None
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBlock(cin, w, 1))

    def forward(self, x):
        outs = [self.b1(x), self.b3(x)] + ([self.b5(x)] if self.b5 is not None else []) + [self.bp(x)]
        return torch.cat(outs, 1)


class Input_Mix_Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(ConvBlock(5, 32, 1), nn.AvgPool2d(2), InceptionBlock(32, 64), InceptionBlock(64, 64),
                                 nn.AvgPool2d(2), InceptionBlock(64, 32), InceptionBlock(32, 32), nn.AvgPool2d(2),
                                 InceptionBlock(32, 12, five=False), nn.Flatten())
        self.cnn_fc = nn.Sequential(nn.Linear(192, 1096), nn.ReLU(), nn.Linear(1096, 1096))
        mag = [nn.Linear(5, 1024)]
        for _ in range(4):
            mag += [nn.ReLU(), nn.Linear(1024, 1024)]
        self.mag_fc = nn.Sequential(*mag)


class ViT_Astro(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 192) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 192) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block() for _ in range(12)])
        self.global_pool = True
        self.fc_norm = nn.LayerNorm(192, eps=1e-6)
        self.head = nn.Linear(192, 192)
        self.fc_head = nn.Sequential(nn.Linear(192, 1096), nn.ReLU(), nn.Linear(1096, 1096))
        self.input_mix = Input_Mix_Model()
        self.regressor = nn.Sequential(nn.Linear(3216, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward(self, img, mag):
        x = self.patch_embed(img)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed)
        x = self.fc_norm(self.blocks(x)[:, 1:].mean(1))
        vit = self.fc_head(self.head(x))
        cnn = self.input_mix.cnn_fc(self.input_mix.cnn(img))
        return self.regressor(torch.cat([vit, cnn, self.input_mix.mag_fc(mag)], 1))


_register("timm.models.layers.patch_embed", PatchEmbed)
_register("timm.models.vision_transformer", Mlp, Attention, Block)
_register("blocks.photoz", ConvBlock, InceptionBlock, Input_Mix_Model)
_register("blocks.model_vit_inception", ViT_Astro)


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(3)
    model = ViT_Astro()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so BN folding is really exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    buf = io.BytesIO()
    torch.save(nn.DataParallel(model), buf)  # the original layout: a whole pickled DataParallel model
    return model, buf.getvalue()


def _inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 5, 32, 32)).astype(np.float32), rng.normal(18, 1, (n, 5)).astype(np.float32)


def test_imported_checkpoint_reproduces_the_pickled_model(original, tmp_path):
    model, blob = original
    with pytest.raises(pickle.UnpicklingError):  # torch's safe loader cannot read the original at all
        torch.load(io.BytesIO(blob), weights_only=True)
    out = tmp_path / "astromae.safetensors"
    out.write_bytes(import_checkpoint(blob, "orig.pt"))
    images, mags = _inputs()
    with torch.no_grad():
        want = model(torch.from_numpy(images), torch.from_numpy(mags)).squeeze(1).numpy()
    pred = load_model("astromae", weights=str(out), threads=1)
    got = pred.predict(images, mags)
    assert got.shape == (6,) and got.dtype == np.float32
    assert np.abs(want).max() > 1e-3  # a meaningful comparison, not zeros against zeros
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the pickled checkpoint itself is accepted by load_model too (converted on the fly, same numbers)
    raw = tmp_path / "orig.pt"
    raw.write_bytes(blob)
    np.testing.assert_allclose(load_model("astromae", weights=str(raw), threads=1).predict(images, mags), got,
                               rtol=0, atol=1e-7)


def test_cli_import_cai(original, tmp_path):
    from cosmicai.cli import main

    _, blob = original
    src = tmp_path / "Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt"
    src.write_bytes(blob)
    assert main(["model", "import-cai", str(src), "--out", str(tmp_path / "w.safetensors")]) == 0
    state, _ = state_from_bytes((tmp_path / "w.safetensors").read_bytes())
    assert "blocks.11.attn.qkv.weight" in state and "fusion.2.bias" in state and len(state) > 200


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


def _pickle_with_global(module: str, name: str) -> bytes:
    import zipfile

    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")\x81."  # GLOBAL, EMPTY_TUPLE, NEWOBJ, STOP
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    assert pickle.PROTO  # payload is protocol-2 pickle
    return buf.getvalue()


def test_plain_state_dicts_are_accepted(tmp_path):
    from safetensors.torch import save_file

    from cosmicai.models.astromae import build_astromae

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

    from cosmicai.models.astromae import build_astromae

    state = {k: v.contiguous() for k, v in build_astromae(seed=1).state_dict().items()}
    del state["fusion.2.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(ModelError, match=r"missing key\(s\): fusion\.2\.bias.*unexpected key\(s\): extra\.weight"):
        load_model("astromae", weights=str(path))
    state["fusion.2.bias"] = torch.zeros(1)
    del state["extra.weight"]
    state["head.weight"] = torch.zeros(10, 10)
    save_file(state, path)
    with pytest.raises(ModelError, match=r"head\.weight \(10, 10\) \(expected \(192, 192\)\)"):
        load_model("astromae", weights=str(path))
