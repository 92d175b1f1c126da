"""The fine-tuned AstroMAE redshift regressor in plain PyTorch.

Three branches are fused into one redshift:

* a ViT encoder (img 32, patch 8, 5 bands, dim 192, depth 12, 3 heads, MLP ratio 4, LayerNorm eps 1e-6;
  cls + 16 patch tokens, mean of the patch tokens, ``fc_norm``) followed by ``head`` Linear(192,192) and
  ``vit_mlp`` Linear(192,1096)-ReLU-Linear(1096,1096);
* an Inception CNN (``mix.inception``: a bare 1x1 Conv2d 5->32, then Inception blocks whose convs are
  Conv+BatchNorm+ReLU) on the same image, flattened to 192 and mapped by ``mix.inception_mlp`` to 1096 features;
* a magnitude MLP (``mix.mag_mlp``) 5 -> 1024;

``fusion`` maps the 3216 concatenated features to one value. This is the authors' ``ViT_Astro`` layer for layer
(github mstaylor/AI-for-Astronomy, ``blocks/model_vit_inception.py`` and ``blocks/photoz.py``); their state-dict
names map onto ours in ``convert.py`` (table in docs/model.md). The ViT keeps timm 0.4.12's names.

Cost (measured by ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add):
15,800,961 parameters and 0.219 GFLOP per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AstroMAEConfig:
    """Hyper-parameters of the network (the defaults are the published AstroMAE fine-tuning model)."""

    img_size: int = 32
    patch_size: int = 8
    in_chans: int = 5
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    branch_dim: int = 1096
    mag_dim: int = 1024
    n_mags: int = 5
    fusion_dim: int = 1024


# --------------------------------------------------------------------------- ViT (timm 0.4.12 layout)


class PatchEmbed(nn.Module):
    """Image -> sequence of patch embeddings via a strided convolution (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; ``fused`` switches to scaled_dot_product_attention (same maths)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- Inception branch


class ConvBlock(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU with 'same' padding."""

    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def inception_widths(cout: int, with_5x5: bool) -> dict[str, int]:
    """Branch widths: ``cout`` split evenly over the branches (the 1x1 branch takes the remainder); each
    3x3/5x5 conv is preceded by a 1x1 reduction of the same width. This gives 15.80 M parameters and
    0.219 GFLOP per image for the whole model, the published figures."""
    n = 4 if with_5x5 else 3
    width = cout // n
    widths = {"b1": cout - width * (n - 1), "r3": width, "b3": width, "pool": width}
    if with_5x5:
        widths.update(r5=width, b5=width)
    return widths


class InceptionBlock(nn.Module):
    """GoogLeNet-style block: 1x1 | 1x1->3x3 | 1x1->5x5 (optional) | maxpool3->1x1, concatenated in that order.

    The authors' ``blocks.photoz.InceptionBlock`` names these ``branch1 .. branch4``; their last block builds the
    5x5 branch but its forward skips it (``is_custom``), so ours does not build it (``with_5x5=False``)."""

    def __init__(self, cin: int, cout: int, with_5x5: bool = True):
        super().__init__()
        w = inception_widths(cout, with_5x5)
        self.branch1x1 = ConvBlock(cin, w["b1"], 1)
        self.branch3x3 = nn.Sequential(ConvBlock(cin, w["r3"], 1), ConvBlock(w["r3"], w["b3"], 3))
        self.branch5x5 = (nn.Sequential(ConvBlock(cin, w["r5"], 1), ConvBlock(w["r5"], w["b5"], 5))
                          if with_5x5 else None)
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBlock(cin, w["pool"], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.branch1x1(x), self.branch3x3(x)]
        if self.branch5x5 is not None:
            outs.append(self.branch5x5(x))
        outs.append(self.branch_pool(x))
        return torch.cat(outs, dim=1)


def inception_stack(in_chans: int) -> nn.Sequential:
    """A bare Conv2d 1x1 5->32 (no BatchNorm, no ReLU: the authors' ``conv2d_init``), pool, 32->64, 64->64, pool,
    64->32, 32->32, pool, 32->12 (no 5x5), flatten (192). Pools are AvgPool2d(2)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 1), nn.AvgPool2d(2),
        InceptionBlock(32, 64), InceptionBlock(64, 64), nn.AvgPool2d(2),
        InceptionBlock(64, 32), InceptionBlock(32, 32), nn.AvgPool2d(2),
        InceptionBlock(32, 12, with_5x5=False), nn.Flatten(1),
    )


class MixBranch(nn.Module):
    """The CNN image branch and the magnitude MLP (the original's ``Input_Mix_Model`` role); a container of
    parameters: ``AstroMAE.image_features`` runs ``inception`` and ``AstroMAE.regress`` the two MLPs."""

    def __init__(self, cfg: AstroMAEConfig):
        super().__init__()
        self.inception = inception_stack(cfg.in_chans)
        flat = 12 * (cfg.img_size // 8) ** 2
        self.inception_mlp = nn.Sequential(nn.Linear(flat, cfg.branch_dim), nn.ReLU(),
                                           nn.Linear(cfg.branch_dim, cfg.branch_dim))
        layers: list[nn.Module] = [nn.Linear(cfg.n_mags, cfg.mag_dim)]
        for _ in range(4):
            layers += [nn.ReLU(), nn.Linear(cfg.mag_dim, cfg.mag_dim)]
        self.mag_mlp = nn.Sequential(*layers)


# --------------------------------------------------------------------------- the whole model


class AstroMAE(nn.Module):
    """AstroMAE fine-tuned regressor: ``forward(images [N,5,32,32], magnitudes [N,5]) -> redshift [N]``."""

    def __init__(self, cfg: AstroMAEConfig | None = None):
        super().__init__()
        cfg = cfg or AstroMAEConfig()
        self.cfg = cfg
        d = cfg.embed_dim
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, d))
        self.blocks = nn.ModuleList([Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth)])
        self.fc_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head = nn.Linear(d, d)
        self.vit_mlp = nn.Sequential(nn.Linear(d, cfg.branch_dim), nn.ReLU(),
                                     nn.Linear(cfg.branch_dim, cfg.branch_dim))
        self.mix = MixBranch(cfg)
        self.fusion = nn.Sequential(nn.Linear(2 * cfg.branch_dim + cfg.mag_dim, cfg.fusion_dim), nn.ReLU(),
                                    nn.Linear(cfg.fusion_dim, 1))

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.regress(self.image_features(images), magnitudes)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The per-image, compute-heavy part: ``[N, 5, 32, 32] -> [N, 384]`` (ViT ``fc_norm`` output, then the
        flattened Inception output). Inference engines run it in small cache-sized batches."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return torch.cat([self.fc_norm(x[:, 1:, :].mean(dim=1)), self.mix.inception(images)], dim=1)

    def regress(self, features: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """The weight-heavy MLPs: ``image_features`` + magnitudes ``[N, 5]`` -> redshift ``[N]`` (best run in
        large batches, so their ~30 MB of weights are read once per batch)."""
        d = self.cfg.embed_dim
        vit = self.vit_mlp(self.head(features[:, :d]))
        cnn = self.mix.inception_mlp(features[:, d:])
        feats = torch.cat([vit, cnn, self.mix.mag_mlp(magnitudes)], dim=1)
        return self.fusion(feats).squeeze(1)

    def set_fused_attention(self, fused: bool) -> None:
        """Use torch's scaled_dot_product_attention (mathematically the same attention)."""
        for blk in self.blocks:
            blk.attn.fused = fused


def init_weights(model: AstroMAE, seed: int = 0) -> AstroMAE:
    """Seeded random initialisation: timm-style truncated normal (std 0.02) in the ViT, Kaiming for layers
    followed by ReLU, 1/sqrt(fan_in) for branch outputs and a near-zero last layer (output starts near 0)."""
    gen = torch.Generator().manual_seed(seed)
    last_layers = {"vit_mlp.2.weight", "mix.inception_mlp.2.weight", "mix.mag_mlp.8.weight", "head.weight"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            normal = torch.randn(p.shape, generator=gen).clamp_(-2, 2)
            if name in ("cls_token", "pos_embed") or (name.startswith("blocks.") and p.ndim == 2):
                p.copy_(normal * 0.02)
            elif p.ndim == 1:
                is_norm_weight = name.endswith(".weight") and ("norm" in name or ".bn." in name)
                p.fill_(1.0 if is_norm_weight else 0.0)
            elif name == "fusion.2.weight":
                p.copy_(normal * 1e-3)
            else:
                fan_in = p[0].numel()
                gain = 1.0 if name in last_layers else 2.0
                p.copy_(normal * math.sqrt(gain / fan_in))
    return model


def build_astromae(seed: int | None = None) -> AstroMAE:
    """A new AstroMAE in eval mode; seeded random weights when ``seed`` is given."""
    model = AstroMAE()
    if seed is not None:
        init_weights(model, seed)
    return model.eval()


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, batch: int = 2) -> float:
    """FLOPs per image by FlopCounterMode (2 FLOPs per multiply-add; element-wise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(batch, 5, 32, 32)
    mags = torch.zeros(batch, 5)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images, mags)
    return counter.get_total_flops() / batch
