"""Oracle of the authors' ``blocks/photoz.py``: the Inception CNN and the magnitude MLP (``Input_Mix_Model``).

Only the configuration their fine-tuned model uses is built: ``Inception_only=False, magnitude=True,
uk_paper=False``. Notable facts kept from their code: ``conv2d_init`` is a bare 1x1 Conv2d (no BatchNorm, no
ReLU) and is the first layer of ``vis_inception`` too (one module, two names); every conv inside an Inception
block is Conv -> BatchNorm -> ReLU; the last block (``is_custom``) builds ``branch3`` but its forward skips it.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, in_channels, out_chanels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_chanels, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_chanels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    def __init__(self, in_channels, out_1x1, red_3x3, out_3x3, red_5x5, out_5x5, out_pool, is_custom=False):
        super().__init__()
        self.is_custom = is_custom
        self.branch1 = ConvBlock(in_channels, out_1x1, kernel_size=1)
        self.branch2 = nn.Sequential(ConvBlock(in_channels, red_3x3, kernel_size=1, padding=0),
                                     ConvBlock(red_3x3, out_3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(ConvBlock(in_channels, red_5x5, kernel_size=1),
                                     ConvBlock(red_5x5, out_5x5, kernel_size=5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, padding=1, stride=1),
                                     ConvBlock(in_channels, out_pool, kernel_size=1))

    def forward(self, x):
        used = [self.branch1, self.branch2] + ([] if self.is_custom else [self.branch3]) + [self.branch4]
        return torch.cat([branch(x) for branch in used], 1)


#: (in_channels, width of every branch) of the five Inception blocks, in order.
_BLOCKS = [(32, 16), (64, 16), (64, 8), (32, 8), (32, 4)]


class Input_Mix_Model(nn.Module):
    def __init__(self, in_channel, out_channel, embed_dim, Inception_only, magnitude, uk_paper):
        super().__init__()
        if Inception_only or not magnitude or uk_paper:
            raise NotImplementedError("the oracle builds the fine-tuned configuration only")
        self.Inception_only = Inception_only
        self.magnitude = magnitude
        self.uk_paper = uk_paper
        self.embed_dim = embed_dim
        self.device = "cpu"
        self.conv2d_init = nn.Conv2d(in_channel, out_channel, kernel_size=(1, 1), padding_mode="zeros")
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2)
        widths = [5] + [1024] * 4
        mag = []
        for i, (a, b) in enumerate(zip(widths, [1024] * 5)):
            mag += ([nn.ReLU()] if i else []) + [nn.Linear(a, b)]
        self.magnitude_block = nn.Sequential(*mag)
        self.vis_inception = nn.Sequential(*self._vis_layers())

    def _vis_layers(self):
        layers = [self.conv2d_init, self.avgpool]
        for i, (cin, w) in enumerate(_BLOCKS):
            layers.append(InceptionBlock(cin, w, w, w, w, w, w, is_custom=(i == len(_BLOCKS) - 1)))
            if i in (1, 3):
                layers.append(nn.AvgPool2d(kernel_size=2))
        return layers + [nn.Flatten(), nn.Linear(self.embed_dim, 1096), nn.ReLU(), nn.Linear(1096, 1096)]

    def forward(self, x):
        images, magnitudes = x[0], x[1]
        return torch.cat((self.vis_inception(images), self.magnitude_block(magnitudes.float())), 1)
