"""Oracle of the encoder half of the authors' 5-band MAE (``mae_vit_base_patch16_dec512d8b`` as configured in
their ``model_mae_5chnnl.py``: img 32, patch 8, 5 bands, dim 192, depth 12, 3 heads, MLP ratio 4, qkv bias,
LayerNorm eps 1e-6). Returns the parts ``ViT_Astro`` takes."""

from functools import partial

import torch
from torch import nn

from timm.models.layers.patch_embed import PatchEmbed
from timm.models.vision_transformer import Block


def encoder_parts(depth=12, sequential=False):
    patch_embed = PatchEmbed(32, 8, 5, 192)
    norm = partial(nn.LayerNorm, eps=1e-6)
    blocks = [Block(192, 3, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
    return {
        "cls_token": nn.Parameter(torch.zeros(1, 1, 192)),
        "pos_embed": nn.Parameter(torch.zeros(1, patch_embed.num_patches + 1, 192), requires_grad=False),
        "blocks": nn.Sequential(*blocks) if sequential else nn.ModuleList(blocks),
        "patch_embed": patch_embed,
    }
