"""Model FLOPs of BERT-shape encoders with a QA head, and the peak FLOP/s of the device they run on.

Model FLOPs utilisation (MFU, PaLM appendix B) = the FLOPs the model needs per second of training ÷
the hardware's peak. Only matrix multiplications are counted (they are >99% of the arithmetic of a
BERT layer; layer norm, softmax, GELU, dropout and the CRF recursion are element-wise and bound by
memory, not by the matmul units the peak describes). A training step costs 3× its forward matmuls:
the backward pass multiplies by each weight twice (gradient of the input and of the weight).
Activation recomputation, if any, is not counted: it is work the model does not need.

Counts are per window on its real tokens: a bucketed batch padded to its longest window is counted
by what its windows need, so padding shows up as lost utilisation, not as useful work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

HEAD_OUTPUTS = {"span": 2, "crf": 4}  # start/end logits; O, B, I, E emissions (default `span_end` tags)


@dataclass(frozen=True)
class EncoderShape:
    """The sizes of a BERT-shape encoder and its QA head that decide its FLOPs."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    head_outputs: int = 2

    @classmethod
    def from_config(cls, config, head: str = "span") -> EncoderShape:
        """From a transformers BertConfig-like object (num_hidden_layers, hidden_size, intermediate_size)."""
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            head_outputs=HEAD_OUTPUTS[head],
        )


def forward_flops(shape: EncoderShape, length: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over one window of `length` real tokens."""
    h, f = shape.hidden_size, shape.intermediate_size
    # Per token and layer: Q, K, V and output projections (4·h·h) and the two FFN matrices (2·h·f).
    dense_per_token = shape.num_layers * 2 * (4 * h * h + 2 * h * f) + 2 * h * shape.head_outputs
    # Per layer, Q·Kᵀ and softmax·V each take L·L·h multiply-adds (summed over the heads).
    attention = shape.num_layers * 2 * 2 * length * length * h
    return length * dense_per_token + attention


def train_flops(shape: EncoderShape, length: int) -> int:
    """Forward + backward matmul FLOPs of one window: 3× the forward."""
    return 3 * forward_flops(shape, length)


def batch_train_flops(shape: EncoderShape, lengths) -> int:
    """Training FLOPs of a batch, counted per window on its real tokens (padding is not model work)."""
    return sum(train_flops(shape, int(length)) for length in lengths)


# Dense (no 2:4 sparsity) peak tensor FLOP/s, in TFLOP/s, from NVIDIA's published figures:
#   A100 (SXM4 and PCIe, 40/80 GB): "NVIDIA A100 Tensor Core GPU" datasheet (2021) — FP32 19.5,
#     TF32 156, BF16 312, FP16 312.
#   H100 SXM5: "NVIDIA H100 Tensor Core GPU Architecture" whitepaper v1.03, table 3 — FP32 66.9,
#     TF32 494.7, BF16/FP16 989.4 (the datasheet's 989/1,979 are with sparsity).
#   H100 PCIe: same whitepaper, table 3 — FP32 51.2, TF32 378, BF16/FP16 756.
#   H100 NVL: "NVIDIA H100 Tensor Core GPU" datasheet — FP32 60, TF32 417.5, BF16/FP16 835.5
#     (half its sparse 835/1,671).
#   H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet — FP32 67, TF32 494.5, BF16/FP16 989.5 (half
#     its sparse 989/1,979; the same GH100 compute as H100 SXM with more, faster memory).
#   H200 NVL: same datasheet — FP32 60, TF32 417.5, BF16/FP16 835.5.
# Checked in this order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is SXM).
PEAK_TFLOPS: list[tuple[str, tuple[str, ...], dict[str, float]]] = [
    ("H200 NVL", ("H200", "NVL"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200 SXM", ("H200",), {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    ("H100 NVL", ("H100", "NVL"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100 PCIe", ("H100", "PCIE"), {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 SXM", ("H100",), {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", ("A100",), {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
]

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DevicePeak:
    """The peak FLOP/s that MFU divides by, and where it came from."""

    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    dtype: str  # fp32 | tf32 | bf16 | fp16: the arithmetic the matmuls actually use
    flops_per_s: float
    source: str  # "table: H100 SXM" or "measured: 1024x1024x1024 fp32 matmul, best of 10"


def table_peak(device_name: str, dtype: str) -> tuple[str, float] | None:
    """(table row, FLOP/s) for a known GPU name and dtype, or None for a GPU not in the table."""
    name = device_name.upper()
    for row, needles, peaks in PEAK_TFLOPS:
        if all(needle in name for needle in needles):
            return row, peaks[dtype] * 1e12
    return None


def matmul_dtype(device: torch.device, dtype: str) -> str:
    """The arithmetic fp32 matmuls really use: TF32 on a CUDA GPU where torch allows it."""
    if dtype == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return dtype


def measured_matmul_peak(
    device: torch.device, dtype: str, repeats: int = 10, min_seconds: float = 0.05, max_n: int | None = None
) -> tuple[float, int]:
    """(best FLOP/s, n) of an n×n×n matmul in `dtype`, n doubled until one multiply takes min_seconds.

    A stand-in for the peak where no published figure applies (a CPU, an unknown GPU): what this
    device's matmul library reaches on a large square product, which a model's smaller, oddly shaped
    matmuls rarely beat. The best of `repeats`, so that on a CPU shared with other processes it is
    the rate of an uncontended moment (MFU then counts the contention as lost utilisation).
    """
    torch_dtype = TORCH_DTYPES[dtype]
    max_n = max_n or (16384 if device.type == "cuda" else 4096)
    n = min(1024, max_n)  # smaller products measure call overhead and thread wake-up, not the peak
    while True:
        seconds = _time_matmul(device, torch_dtype, n, repeats=1)
        if seconds >= min_seconds or n >= max_n:
            break
        n *= 2
    seconds = _time_matmul(device, torch_dtype, n, repeats=repeats)
    return 2 * n**3 / seconds, n


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Fastest of `repeats` timed n×n matmuls (after one untimed), in seconds."""
    # a private generator: measuring must not move the training run's random streams
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's marketing name, or the CPU with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def device_peak(device: torch.device, dtype: str, repeats: int = 10) -> DevicePeak:
    """The dense peak FLOP/s of `device` for training in `dtype`: NVIDIA's table, else measured (the
    best of `repeats` large matmuls)."""
    name = device_name(device)
    arithmetic = matmul_dtype(device, dtype)
    if device.type == "cuda":
        known = table_peak(name, arithmetic)
        if known is not None:
            return DevicePeak(name, arithmetic, known[1], f"table: {known[0]}")
    flops, n = measured_matmul_peak(device, dtype, repeats=repeats)
    return DevicePeak(name, arithmetic, flops, f"measured: {n}x{n}x{n} {dtype} matmul, best of {repeats}")
