"""Oracle of the authors' ``blocks/model_vit_inception.py``: ``ViT_Astro`` fuses the MAE encoder, the Inception
branch and the magnitude MLP. ``forward([images, magnitudes]) -> [N, 1]``."""

import torch
from torch import nn

from blocks.photoz import Input_Mix_Model


class ViT_Astro(nn.Module):
    def __init__(self, embed_dim, vit_layers):
        super().__init__()
        self.embed_dim = embed_dim
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, embed_dim)
        self.inception_model = Input_Mix_Model(in_channel=5, out_channel=32, embed_dim=embed_dim,
                                               Inception_only=False, magnitude=True, uk_paper=False)
        # the pre-trained encoder's parts, frozen (requires_grad only; the maths is unchanged)
        self.cls_token = vit_layers["cls_token"]
        self.pos_embed = vit_layers["pos_embed"]
        self.blocks = vit_layers["blocks"]
        self.patch_embed = vit_layers["patch_embed"]
        for p in self.blocks.parameters():
            p.requires_grad = False
        for p in self.patch_embed.parameters():
            # Their code misspells the attribute here, which leaves a stray Python attribute on each of these
            # Parameters: torch.save then pickles them with torch._utils._rebuild_parameter_with_state.
            p.requres_grad = False
        self.patch_embed.proj.weight.requires_grad = False
        self.patch_embed.proj.bias.requires_grad = False
        self.vit_block = nn.Sequential(nn.Linear(embed_dim, 1096), nn.ReLU(), nn.Linear(1096, 1096))
        self.concat_block = nn.Sequential(nn.Linear(3216, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward(self, x):
        tokens = self.patch_embed(x[0])
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.pos_embed
        for blk in self.blocks:
            tokens = blk(tokens)
        vit = self.fc_norm(tokens[:, 1:, :].mean(dim=1))  # mean of the patch tokens, cls token left out
        vit = self.vit_block(self.head(vit))
        return self.concat_block(torch.cat((vit, self.inception_model(x)), 1))
