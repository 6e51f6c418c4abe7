"""Weight-only quantization of the decoder's linear layers: int8 per output channel (symmetric) and
int4 in groups of input columns (with zero points), each run by a kernel that reads the packed weights.

    int8:  W[n, k] ~ q[n, k] * s[n]                              q in -127..127
    int4:  W[n, k] ~ (q[n, k] - 8) * s[g, n] + z[g, n]            q in 0..15, g = k // group

int4 keeps a zero point per group (z = min + 8 s, the convention of torch's int4pack kernels, which
take `scales_and_zeros` whatever we choose): the 16 levels then span each group's [min, max], so the
worst rounding error is (max - min) / 30, against max|w| / 14 for symmetric levels, at no extra cost.

Kernels: `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (CPU) or
`torch._weight_int4pack_mm` (CUDA, bf16). Where this torch has no kernel for the device, dtype or
shape, the layer keeps the plain packing (int8, or two int4 per byte) and dequantizes at every call
before an ordinary matmul: correct everywhere, but slower, and it says so once on stderr.

The activations and scales are in the model's dtype (`--dtype`). The backward (QLoRA) gives the
input its gradient through the dequantized weight and the frozen weight none.
"""

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llavarad.errors import first_line

MODES = ("int8", "int4")
# The linear layers of the decoder blocks: 97% of the 7B weights. The embeddings and lm_head stay
# in the model dtype (BENCHMARKS.md measures what quantizing lm_head would give).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 128
CUDA_INNER_K_TILES = 8  # the tile width gpt-fast and torchao use for the CUDA int4 kernel
_said: set[str] = set()


def say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def quantize_int8(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q int8 (N, K), scales (N,) in `dtype`. q is rounded against the stored
    (dtype-rounded) scale, so dequantize(q, s) is the best int8 grid the stored scale allows."""
    s = (w.abs().amax(1).float().clamp(min=1e-8) / 127).to(dtype)  # (N,)
    # One float32 copy, rounded in place: a 7B layer is 180 MB in float32, and loading holds one at a time.
    q = w.to(torch.float32, copy=True).div_(s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w (N, K), K a multiple of `group` -> q int32 (N, K) in 0..15, scales_and_zeros (K/group, N, 2)
    in `dtype` ([..., 0] the scale, [..., 1] the zero point): the int4pack kernels' layouts."""
    N, K = w.shape
    wg = w.to(torch.float32, copy=True).reshape(N, K // group, group)  # (N, G, group), rounded in place below
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    s = ((hi - lo).clamp(min=1e-8) / 15).to(dtype)
    z = (lo + 8 * s.float()).to(dtype)
    q = wg.sub_(z.float()[..., None]).div_(s.float()[..., None]).add_(8).round_().clamp_(0, 15)
    return q.to(torch.int32).reshape(N, K), torch.stack([s, z], -1).transpose(0, 1).contiguous()


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    """(N, K) float32."""
    return q.float() * s.float()[:, None]


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """q (N, K) in 0..15, scales_and_zeros (K/group, N, 2) -> (N, K) float32."""
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, G) each
    return ((q.float().reshape(N, s.shape[1], -1) - 8) * s[..., None] + z[..., None]).reshape(N, K)


def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, the even column in the high nibble (the CUDA packer's input)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(p: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int32."""
    return torch.stack([p >> 4, p & 15], -1).reshape(p.shape[0], -1).to(torch.int32)


class QuantLinear(nn.Module):
    """A bias-free linear layer y = x W^T with W quantized. Buffers: `weight` (the packed codes, in the
    kernel's layout or the plain one) and `scales` (int8: (N,); int4: scales_and_zeros (K/group, N, 2))."""

    def __init__(self, weight: Tensor, scales: Tensor, mode: str, in_features: int, out_features: int,
                 group: int, kernel: str | None):
        super().__init__()
        self.mode, self.in_features, self.out_features, self.group = mode, in_features, out_features, group
        self.kernel = kernel  # "int8", "int4_cpu", "int4_cuda", or None: dequantize then matmul
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, w: Tensor, mode: str, dtype: torch.dtype, device: torch.device | str,
                   group: int = GROUP_SIZE, trainable_input: bool = False) -> "QuantLinear":
        """Quantize a float weight (N, K) for `device`, activations in `dtype`. A shape, device or dtype
        the kernel cannot take gets the plain layout (one line on stderr, once). `trainable_input`
        (QLoRA): int4 keeps the plain layout, whose dequantized weight the backward needs; this is
        the bitsandbytes way (dequantize, then a 16-bit matmul), which suits training's long inputs."""
        if mode not in MODES:
            raise ValueError(f"quantize {mode!r}: choose from {', '.join(MODES)}")
        N, K = w.shape
        w = w.to(device)
        if mode == "int8":
            q, s = quantize_int8(w, dtype)
            layer = cls(q, s, mode, K, N, 0, "int8")
        else:
            if K % group:
                g = math.gcd(group, K)
                say_once(f"int4: in_features {K} is not a multiple of the group size {group}; groups of {g} for those layers")
                group = g
            q, sz = quantize_int4(w, group, dtype)
            if trainable_input:
                return cls(pack_nibbles(q), sz, mode, K, N, group, None)
            kernel = "int4_cuda" if w.device.type == "cuda" else "int4_cpu"
            packed = _pack_int4(q, kernel)
            layer = cls(packed if packed is not None else pack_nibbles(q), sz, mode, K, N, group, kernel)
        try:  # a kernel that rejects this device, dtype or shape says so here, once, not in the middle of a run
            with torch.no_grad():
                layer.matmul(torch.zeros(1, K, dtype=dtype, device=w.device))
        except (RuntimeError, NotImplementedError) as e:
            say_once(f"{mode}: no packed kernel for {w.device.type} {dtype} {tuple(w.shape)} here ({first_line(e)}); "
                     f"dequantizing at every call instead (correct, slower)")
            layer = cls(q if mode == "int8" else pack_nibbles(q), layer.scales, mode, K, N, group, None)
        return layer

    def dequantized(self) -> Tensor:
        """W as the forward uses it, (N, K) in the activation dtype. Only the int8 and plain layouts
        unpack: the int4 kernels' tiled layouts are for inference."""
        if self.mode == "int8":
            return dequantize_int8(self.weight, self.scales).to(self.scales.dtype)
        if self.kernel is not None:
            raise NotImplementedError("int4 weights packed for the inference kernel have no gradient path; "
                                      "quantize with trainable_input=True for training")
        return dequantize_int4(unpack_nibbles(self.weight), self.scales).to(self.scales.dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """x (M, K) in the activation dtype -> (M, N)."""
        if self.kernel == "int8":
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        if self.kernel == "int4_cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scales)
        if self.kernel == "int4_cuda":
            return torch._weight_int4pack_mm(x, self.weight, self.group, self.scales)
        return F.linear(x, self.dequantized())

    def forward(self, x: Tensor) -> Tensor:
        return _QuantMatmul.apply(x, self)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}, kernel={self.kernel}"


def _pack_int4(q: Tensor, kernel: str) -> Tensor | None:
    """q (N, K) int32 0..15 -> the kernel's packed layout, or None when the packer rejects the shape."""
    try:
        if kernel == "int4_cpu":
            return torch._convert_weight_to_int4pack_for_cpu(q, 1)
        return torch._convert_weight_to_int4pack(pack_nibbles(q), CUDA_INNER_K_TILES)
    except (RuntimeError, NotImplementedError):
        return None  # from_float's trial matmul then fails too, says why, and keeps the plain layout


class _QuantMatmul(torch.autograd.Function):
    """x (..., K) -> (..., N) through the kernel; backward: dL/dx = dL/dy W (W dequantized), no dL/dW."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        dtype = layer.scales.dtype
        y = layer.matmul(x.reshape(-1, layer.in_features).to(dtype))  # (M, N)
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        w = layer.dequantized()  # (N, K), only while this backward runs
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None
