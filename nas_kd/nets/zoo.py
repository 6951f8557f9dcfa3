"""The teacher zoo: CIFAR-style teacher architectures written as `Spec`s, so they adapt to any
input channels, size and class count, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from nas_kd.core.errors import InputError
from nas_kd.nets.arch import Spec, StageSpec, build
from nas_kd.nets.cost import Cost, count

TEACHERS: dict[str, Callable[[], Spec]] = {}


def register_teacher(name: str, factory: Callable[[], Spec]) -> None:
    TEACHERS[name] = factory


def teacher_spec(name: str) -> Spec:
    if name not in TEACHERS:
        raise InputError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    return TEACHERS[name]()


def _resnet(blocks_per_stage: int, widen: int = 1) -> Callable[[], Spec]:
    """CIFAR ResNet-(6n+2) (He et al. 2016) and, with widen = k, WRN-(6n+4)-k (Zagoruyko &
    Komodakis 2016; here with post-activation basic blocks and no dropout)."""
    def factory() -> Spec:
        widths = (16 * widen, 32 * widen, 64 * widen)
        return Spec(16, tuple(StageSpec("basic", blocks_per_stage, w, 1 if i == 0 else 2)
                              for i, w in enumerate(widths)))
    return factory


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_teacher(f"resnet{_depth}", _resnet((_depth - 2) // 6))
for _depth, _k in ((16, 2), (16, 4), (40, 2)):
    register_teacher(f"wrn{_depth}_{_k}", _resnet((_depth - 4) // 6, _k))


def _vgg(layers: tuple[int, ...]) -> Callable[[], Spec]:
    """CIFAR VGG with BatchNorm: five stages of widths 64..512, max-pool between them."""
    def factory() -> Spec:
        widths = (64, 128, 256, 512, 512)
        return Spec(32, tuple(StageSpec("conv", n, w, 1 if i == 0 else 2) for i, (n, w) in enumerate(zip(layers, widths))))
    return factory


register_teacher("vgg8_bn", _vgg((1, 1, 1, 1, 1)))
register_teacher("vgg11_bn", _vgg((1, 1, 2, 2, 2)))
register_teacher("vgg13_bn", _vgg((2, 2, 2, 2, 2)))


def _mobilenetv2(width: float) -> Callable[[], Spec]:
    """MobileNetV2 (Sandler et al. 2018) with the CIFAR strides: the first two downsamplings removed."""
    def factory() -> Spec:
        def w(c: int) -> int:
            return max(8, int(c * width + 4) // 8 * 8)
        table = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
        return Spec(w(32), tuple(StageSpec("inverted", n, w(c), s, 3, t) for t, c, n, s in table), head=1280)
    return factory


register_teacher("mobilenetv2", _mobilenetv2(1.0))
register_teacher("mobilenetv2_x0_5", _mobilenetv2(0.5))


def teacher_cost(name: str, input_shape: tuple[int, int, int], num_classes: int) -> Cost:
    """MACs and params of teacher `name` at this input (see cost.count)."""
    return count(build(teacher_spec(name), input_shape, num_classes, channels_last=False), input_shape)
