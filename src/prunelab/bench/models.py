"""Model zoo: the small networks of the pruning literature, with stable parameter names.

Every entry is a factory ``build(input_shape, num_classes) -> nn.Module`` where
``input_shape`` is one sample's shape without the batch dimension, e.g. ``(1, 28, 28)``.
Models are plain ``nn.Module`` subclasses with named submodules (``fc1``, ``conv1``...),
so parameter FQNs such as ``fc1.weight`` are stable across versions and match the
papers' layer names.  ReLUs and pools are modules too, so activation hooks (APoZ,
Wanda) can see them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.registry import Registry

__all__ = ["MODELS", "DigitsMLP", "LeNet300100", "LeNet5", "build_model"]

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def _shape(name: str, input_shape: Sequence[int]) -> tuple:
    """``input_shape`` as a tuple; a value that is not a sequence of sizes is a one-line error."""
    try:
        return tuple(input_shape)
    except TypeError:
        raise PrunelabError(f"model {name!r} got input_shape {input_shape!r}; expected a sequence of positive "
                            "integers such as (1, 28, 28)") from None


def _check(name: str, input_shape: Sequence[int], num_classes: int, ndim: int | None = None) -> tuple[int, ...]:
    shape = _shape(name, input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise PrunelabError(f"model {name!r} got input_shape {shape!r}; expected positive integers such as (1, 28, 28)")
    if ndim is not None and len(shape) != ndim:
        raise PrunelabError(
            f"model {name!r} got input_shape {shape!r}; expected {ndim} dims (channels, height, width), "
            f"use an image dataset or an MLP such as 'lenet300'"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise PrunelabError(f"model {name!r} got num_classes={num_classes!r}; expected an integer >= 2")
    return shape


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP (LeCun et al. 1998; pruned by Han et al. 2015).

    266,610 parameters for 784 inputs and 10 classes.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, in_features)
        x = self.relu1(self.fc1(x))  # (B, 300)
        x = self.relu2(self.fc2(x))  # (B, 100)
        return self.fc3(x)  # (B, num_classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 variant, the "LeNet-5" of Han et al. 2015 (431,080 parameters on MNIST).

    conv1 5x5x20 -> maxpool 2 -> conv2 5x5x50 -> maxpool 2 -> fc1 500 -> ReLU -> fc2,
    with no nonlinearity after the convolutions, exactly as Caffe's ``lenet.prototxt``.
    For 28x28 inputs the convolutions are unpadded and fc1 has 800 inputs.  Images
    smaller than 16x16 (e.g. the 8x8 digits) get ``padding=2`` on both convolutions so
    the spatial size survives (8 -> 4 -> 2, fc1 has 200 inputs); parameter names stay
    the same.  ``padding`` records which one was used.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.padding = 2 if min(height, width) < 16 else 0
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5, padding=self.padding)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, padding=self.padding)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * self._side(height) * self._side(width), 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def _side(self, n: int) -> int:
        """Spatial size after (5x5 conv, 2x2 pool) twice."""
        for _ in range(2):
            n = (n + 2 * self.padding - 4) // 2
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))  # (B, 20, 12, 12) for 28x28 input
        x = self.pool2(self.conv2(x))  # (B, 50, 4, 4)
        x = self.relu(self.fc1(self.flatten(x)))  # (B, 500)
        return self.fc2(x)  # (B, num_classes)


class DigitsMLP(nn.Module):
    """A small in-128-64-classes ReLU MLP for the 8x8 digits (17,226 parameters there)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, in_features)
        x = self.relu1(self.fc1(x))  # (B, 128)
        x = self.relu2(self.fc2(x))  # (B, 64)
        return self.fc3(x)  # (B, num_classes)


@MODELS.register("lenet300", "LeNet-300-100 MLP (LeCun et al. 1998; Han et al. 2015), 266,610 params on MNIST")
def build_lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    shape = _check("lenet300", input_shape, num_classes)
    return LeNet300100(math.prod(shape), num_classes)


@MODELS.register("lenet5", "Caffe LeNet-5 (20-50 conv, 500 fc; Han et al. 2015), 431,080 params on MNIST")
def build_lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    shape = _check("lenet5", input_shape, num_classes, ndim=3)
    if min(shape[1:]) < 4:
        raise PrunelabError(
            f"model 'lenet5' got {shape[1]}x{shape[2]} images; expected at least 4x4 (28x28 for the paper's "
            f"setup), use an MLP such as 'lenet300' for tiny inputs"
        )
    return LeNet5(shape, num_classes)  # type: ignore[arg-type]


@MODELS.register("digits_mlp", "64-128-64-10 ReLU MLP for the 8x8 digits, 17,226 params")
def build_digits_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    shape = _check("digits_mlp", input_shape, num_classes)
    return DigitsMLP(math.prod(shape), num_classes)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the registered model ``name`` (see ``prunelab list``) for this input and class count."""
    factory = MODELS.get(name)
    return factory(_shape(name, input_shape), num_classes)
