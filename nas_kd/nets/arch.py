"""Architectures as data: blocks, the `Spec` of a network, and the network built from a spec.

Teachers and students are the same kind of object here: a stem convolution, a sequence of
stages (each a stack of one block type), an optional 1x1 head convolution, global average
pooling and a linear classifier. A `Spec` names one such network and has a short string form,

    c16|basic_d3_w16_s1_k3_e1|basic_d3_w32_s2_k3_e1|inverted_d2_w64_s2_k5_e6_se|h128

(stem width; one token per stage: block, depth, width = output channels, stride of the first
block, kernel, expansion, optional internal width `_m<mid>`, optional squeeze-excite; optional head
width), and a JSON form. Both round-trip, so a trial, a checkpoint and a report name a student the
same way. The internal width is what filter pruning (nas_kd.retraining.prune) shrinks, e.g.
`basic_d3_w16_s1_k3_e1_m9`: conv1 of every block has 9 filters instead of 16.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.core.errors import InputError

# ---------------------------------------------------------------- blocks


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a 2x2 average pool then a 1x1 conv (the ResNet-D shortcut, He et al., "Bag of
    Tricks", 2019): the same MACs and params as a strided 1x1 conv, and it avoids the backward pass
    of strided 1x1 convs in channels_last, which crashes oneDNN in torch 2.14 for some shapes
    (batch 3, 8 input channels: see tests/test_arch.py)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    pool = nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, *conv_bn(cin, cout, 1))


class Block(nn.Module):
    """Base of the registered blocks: (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""

    uses_expand = False  # whether the expansion ratio means anything to this block
    uses_mid = False  # whether the block has an internal width that `mid` can set

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__()

    @classmethod
    def default_mid(cls, cin: int, cout: int, expand: int) -> int:
        """The internal width when `mid` is 0; 0 where the block has none."""
        return 0


class BasicBlock(Block):
    """ResNet basic block (He et al. 2016): two kxk convolutions and a residual; `mid` = filters of the first."""

    uses_mid = True

    @classmethod
    def default_mid(cls, cin: int, cout: int, expand: int) -> int:
        return cout

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__(cin, cout, stride, kernel, expand, se, mid)
        mid = mid or self.default_mid(cin, cout, expand)
        self.conv1 = conv_bn(cin, mid, kernel, stride)
        self.conv2 = conv_bn(mid, cout, kernel)
        nn.init.zeros_(self.conv2[1].weight)  # each block starts as the identity: trains faster
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.conv2(F.relu(self.conv1(x))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(Block):
    """ResNet bottleneck: 1x1 reduce to cout/expand (or `mid`), kxk, 1x1 back to cout, and a residual."""

    uses_expand = True
    uses_mid = True

    @classmethod
    def default_mid(cls, cin: int, cout: int, expand: int) -> int:
        return max(1, cout // expand)

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__(cin, cout, stride, kernel, expand, se, mid)
        mid = mid or self.default_mid(cin, cout, expand)
        self.reduce = conv_bn(cin, mid, 1)
        self.conv = conv_bn(mid, mid, kernel, stride)
        self.restore = conv_bn(mid, cout, 1)
        nn.init.zeros_(self.restore[1].weight)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv(F.relu(self.reduce(x))))
        return F.relu(self.se(self.restore(out)) + self.shortcut(x))


class InvertedResidual(Block):
    """MobileNetV2 block (Sandler et al. 2018): 1x1 expand to cin*expand (or `mid`), depthwise kxk,
    linear 1x1 projection; residual when the shape is kept. Without expansion (expand 1) the hidden
    width is the input's, so there is no internal width to set."""

    uses_expand = True
    uses_mid = True

    @classmethod
    def default_mid(cls, cin: int, cout: int, expand: int) -> int:
        return cin * expand if expand != 1 else 0

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__(cin, cout, stride, kernel, expand, se, mid)
        hidden = mid or cin * expand
        self.expand = conv_bn(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout
        if self.residual:
            nn.init.zeros_(self.project[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.expand(x)) if not isinstance(self.expand, nn.Identity) else x
        out = self.project(self.se(F.relu6(self.depthwise(out))))
        return out + x if self.residual else out


class DepthwiseSeparable(Block):
    """MobileNetV1 block (Howard et al. 2017): depthwise kxk then pointwise 1x1, no residual."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__(cin, cout, stride, kernel, expand, se, mid)
        self.depthwise = conv_bn(cin, cin, kernel, stride, groups=cin)
        self.se = SqueezeExcite(cin) if se else nn.Identity()
        self.pointwise = conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pointwise(self.se(F.relu(self.depthwise(x)))))


class PlainConv(Block):
    """VGG layer (Simonyan & Zisserman 2015, with BN): kxk conv, BN, ReLU; a stride of 2 is a
    2x2 max-pool before the convolution, as in VGG."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int, se: bool, mid: int = 0):
        super().__init__(cin, cout, stride, kernel, expand, se, mid)
        self.pool = nn.MaxPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = conv_bn(cin, cout, kernel)
        self.se = SqueezeExcite(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(F.relu(self.conv(self.pool(x))))


BLOCKS: dict[str, type[Block]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "inverted": InvertedResidual,
    "dwsep": DepthwiseSeparable,
    "conv": PlainConv,
}


def block_class(name: str) -> type[Block]:
    if name not in BLOCKS:
        raise InputError(f"unknown block type {name!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[name]


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class StageSpec:
    block: str
    depth: int  # number of blocks
    width: int  # output channels of every block of the stage
    stride: int = 1  # of the first block; 1 or 2
    kernel: int = 3  # odd
    expand: int = 1  # see the block; must be 1 for blocks that do not use it
    se: bool = False
    mid: int = 0  # internal width of every block of the stage (see the block); 0 = the block's default

    def __post_init__(self) -> None:
        cls = block_class(self.block)
        checks = [
            (self.depth >= 1, f"depth must be >= 1, got {self.depth}"),
            (self.width >= 1, f"width must be >= 1, got {self.width}"),
            (self.stride in (1, 2), f"stride must be 1 or 2, got {self.stride}"),
            (self.kernel >= 1 and self.kernel % 2 == 1, f"kernel must be odd, got {self.kernel}"),
            (self.expand >= 1, f"expand must be >= 1, got {self.expand}"),
            (cls.uses_expand or self.expand == 1,
             f"block {self.block!r} has no expansion ratio; expand must be 1, got {self.expand}"),
            (self.mid >= 0, f"mid must be >= 0, got {self.mid}"),
            (cls.uses_mid or self.mid == 0,
             f"block {self.block!r} has no internal width; mid must be 0, got {self.mid}"),
            (self.mid == 0 or cls.default_mid(self.width, self.width, self.expand) > 0,
             f"block {self.block!r} has no internal width at expand {self.expand}; mid must be 0, got {self.mid}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def token(self) -> str:
        s = f"{self.block}_d{self.depth}_w{self.width}_s{self.stride}_k{self.kernel}_e{self.expand}"
        return s + (f"_m{self.mid}" if self.mid else "") + ("_se" if self.se else "")


_TOKEN = re.compile(r"^(?P<block>[a-z]+)_d(?P<d>\d+)_w(?P<w>\d+)_s(?P<s>\d+)_k(?P<k>\d+)_e(?P<e>\d+)"
                    r"(_m(?P<m>\d+))?(?P<se>_se)?$")


@dataclass(frozen=True)
class Spec:
    stem: int  # channels of the 3x3 stem convolution
    stages: tuple[StageSpec, ...]
    head: int = 0  # channels of a 1x1 conv before pooling (MobileNetV2's 1280); 0 = none

    def __post_init__(self) -> None:
        if self.stem < 1 or not self.stages or self.head < 0:
            raise InputError(f"a spec needs stem >= 1, at least one stage and head >= 0: {self}")

    def __str__(self) -> str:
        parts = [f"c{self.stem}", *(s.token() for s in self.stages)]
        return "|".join(parts + ([f"h{self.head}"] if self.head else []))

    @classmethod
    def parse(cls, text: str) -> Spec:
        parts = text.strip().split("|")
        head = 0
        if len(parts) > 2 and re.fullmatch(r"h\d+", parts[-1]):
            head = int(parts.pop()[1:])
        if len(parts) < 2 or not re.fullmatch(r"c\d+", parts[0]):
            raise InputError(f"bad spec {text!r}: expected 'c<stem>|<stage>|...[|h<head>]', "
                             "e.g. 'c16|basic_d3_w16_s1_k3_e1|basic_d3_w32_s2_k3_e1'")
        stages = []
        for token in parts[1:]:
            m = _TOKEN.match(token)
            if not m:
                raise InputError(f"bad stage {token!r} in spec {text!r}: expected "
                                 "'<block>_d<depth>_w<width>_s<stride>_k<kernel>_e<expand>[_m<mid>][_se]'")
            stages.append(StageSpec(m["block"], int(m["d"]), int(m["w"]), int(m["s"]), int(m["k"]),
                                    int(m["e"]), bool(m["se"]), int(m["m"] or 0)))
        return cls(int(parts[0][1:]), tuple(stages), head)

    def to_json(self) -> str:
        return json.dumps({"stem": self.stem, "stages": [asdict(s) for s in self.stages], "head": self.head})

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            d = json.loads(text)
            return cls(int(d["stem"]), tuple(StageSpec(**s) for s in d["stages"]), int(d.get("head", 0)))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"bad spec JSON ({e}): {text[:200]}") from None


# ---------------------------------------------------------------- network


def downsampled(block: str, stride: int, n: int) -> int:
    """The height (or width) after the first block of a stage: a conv stage max-pools (floor),
    the others pad their strided convolution (ceil)."""
    return n // stride if block == "conv" else -(-n // stride)


def stem_module(cin: int, width: int) -> nn.Sequential:
    """A network's stem: a 3x3 conv of `width` filters on `cin` channels, BatchNorm, ReLU."""
    return nn.Sequential(conv_bn(cin, width, 3), nn.ReLU(inplace=True))


def stage_module(cin: int, stage: StageSpec) -> nn.Sequential:
    """One stage of `stage.depth` blocks on `cin` channels; the first block strides."""
    cls = BLOCKS[stage.block]
    return nn.Sequential(*(cls(cin if i == 0 else stage.width, stage.width, stage.stride if i == 0 else 1, stage.kernel,
                               stage.expand, stage.se, stage.mid) for i in range(stage.depth)))


def head_module(cin: int, width: int) -> nn.Module:
    """The optional 1x1 head conv of `width` filters (0: none) before pooling and the classifier."""
    return nn.Sequential(conv_bn(cin, width, 1), nn.ReLU(inplace=True)) if width else nn.Identity()


class Network(nn.Module):
    """The network of a spec, for any input channels, size and number of classes.

    `forward_features(x)` returns the output of every stage, shallow to deep, each (B, C_i, H_i, W_i);
    `forward_head(last)` maps the deepest one to logits (B, num_classes).
    """

    def __init__(self, spec: Spec, in_channels: int, num_classes: int, image_size: int | None = None):
        super().__init__()
        self.spec = spec
        self.stem = stem_module(in_channels, spec.stem)
        stages, cin, size = [], spec.stem, image_size
        for st in spec.stages:
            if size is not None:
                size = downsampled(st.block, st.stride, size)
                if size < 1:
                    raise InputError(f"spec {spec} downsamples {image_size}px inputs below one pixel")
            stages.append(stage_module(cin, st))
            cin = st.width
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [st.width for st in spec.stages]
        self.head = head_module(cin, spec.head)
        self.classifier = nn.Linear(spec.head or cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, last: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.head(last), 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])


def build(spec: Spec, input_shape: tuple[int, int, int], num_classes: int,
          channels_last: bool = True) -> Network:
    """The network of `spec` for inputs (C, H, W), in channels_last memory (1.3-1.9x faster on CPU)."""
    net = Network(spec, input_shape[0], num_classes, input_shape[-1])
    return net.to(memory_format=torch.channels_last) if channels_last else net
