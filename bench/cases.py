"""What the op benchmark measures: tensors from real models, the case grid, and the byte counts.

Shapes are the residual-add tensors of ResNet-50 (the four stage outputs, NCHW), ViT-B/16 (tokens)
and Swin-T (first stage, NHWC as timm keeps it), at a batch per device: on a GPU one that fills it
(256: the ResNet-50 stage-1 tensor is 784 MiB in fp32), on the CPU one whose tensors lie well past
the last-level cache but keep a full run under ten minutes on two cores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

# Per-sample shapes of the tensors a residual add sees.
MODEL_TENSORS = {
    "ResNet-50 stage 1": (256, 56, 56),
    "ResNet-50 stage 2": (512, 28, 28),
    "ResNet-50 stage 3": (1024, 14, 14),
    "ResNet-50 stage 4": (2048, 7, 7),
    "ViT-B/16 tokens": (197, 768),
    "Swin-T stage 1": (56, 56, 96),
}
BATCH = {"cpu": 8, "cuda": 256}
DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")}
PROBABILITIES = (0.0, 0.1, 0.5)
ACTIVATIONS = ("relu", "none")
PASSES = ("forward", "backward", "forward+backward")
# --quick: the two tensor kinds (convolutional, tokens) at one setting.
QUICK_TENSORS = ("ResNet-50 stage 2", "ViT-B/16 tokens")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Case:
    """One measured setting: a tensor (``label``, ``shape``, ``dtype``), ``p`` and the activation."""
    label: str
    shape: tuple[int, ...]
    dtype: str
    p: float
    activation: str

    @property
    def tensor_bytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_BYTES[self.dtype]

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "tensor_mib": self.tensor_bytes / 2**20}


def case_grid(device_type: str, *, batch: int | None = None, quick: bool = False,
              tensors: tuple[str, ...] | None = None, dtypes: tuple[str, ...] | None = None,
              probabilities: tuple[float, ...] | None = None, activations: tuple[str, ...] | None = None,
              tensor_dtypes: tuple[tuple[str, str], ...] | None = None) -> list[Case]:
    """Every tensor x dtype x p x activation for ``device_type`` (``quick``: two tensors, fp32,
    p=0.1, ReLU; the keywords narrow it; ``tensor_dtypes``: these (tensor, dtype) pairs instead of
    the tensor x dtype product), grouped so that cases sharing a tensor are adjacent."""
    batch = batch or BATCH[device_type]
    labels = tensors or (QUICK_TENSORS if quick else tuple(MODEL_TENSORS))
    dtypes = dtypes or (("float32",) if quick else DTYPES[device_type])
    pairs = tensor_dtypes or tuple((label, dtype) for label in labels for dtype in dtypes)
    probabilities = probabilities or ((0.1,) if quick else PROBABILITIES)
    activations = activations or (("relu",) if quick else ACTIVATIONS)
    return [Case(label, (batch, *MODEL_TENSORS[label]), dtype, p, activation)
            for label, dtype in pairs for activation in activations for p in probabilities]


def minimal_bytes(pass_name: str, case: Case) -> float:
    """docs/design.md's floor for one call. Forward (inference): ``keep*|x| + |r| + |out|``. Backward
    without activation: ``keep*|g| + |g_x|`` (the residual's gradient is ``g`` itself); with ReLU
    the gradient is masked by ``out > 0``, one bit per element that the forward writes and the
    backward reads: ``|g| + numel/8 + |g_r| + |g_x|``, and forward+backward writes the bits too.
    Gradients are written whole (zeros in dropped rows)."""
    size, keep = case.tensor_bytes, 1 - case.p
    sign_bits = size / ELEMENT_BYTES[case.dtype] / 8 if case.activation == "relu" else 0.0
    forward = (keep + 2) * size
    backward = (3 * size + sign_bits) if case.activation == "relu" else (keep + 1) * size
    return {"forward": forward, "backward": backward, "forward+backward": forward + sign_bits + backward}[pass_name]


def last_level_cache_bytes(device) -> int:
    """The device's last-level cache (the GPU's L2; the CPU's largest cache level), 64 MiB if unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 * 2**20)


def rotating_buffers(set_bytes: int, cache_bytes: int, limit: int = 8) -> int:
    """How many input sets to rotate through so that a call never finds its inputs in a cache of
    ``cache_bytes``: enough sets to span twice the cache, at most ``limit``."""
    return max(1, min(limit, math.ceil(2 * cache_bytes / set_bytes)))
