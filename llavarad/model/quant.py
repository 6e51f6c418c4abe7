"""Weight-only quantization of the decoder's linear layers: int8 per output channel (symmetric) and
int4 in groups of input columns (with zero points), each run by a kernel that reads the packed weights.

    int8:  W[n, k] ~ q[n, k] * s[n]                              q in -127..127
    int4:  W[n, k] ~ (q[n, k] - 8) * s[g, n] + z[g, n]            q in 0..15, g = k // group

int4 keeps a zero point per group (z = min + 8 s, the convention of torch's int4pack kernels, which
take `scales_and_zeros` whatever we choose): the 16 levels then span each group's [min, max], so the
worst rounding error is (max - min) / 30, against max|w| / 14 for symmetric levels, at no extra cost.

Kernels: `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (CPU) or
`torch._weight_int4pack_mm` (CUDA, bf16), for few rows (decoding). From DENSE_ROWS rows up (a
prefill) a CPU layer is dequantized into the activation dtype for that one call and multiplied by
the dense matmul, which is many times faster there. Where this torch has no kernel for the device,
dtype or shape, the layer keeps the plain packing (int8, or two int4 per byte) and dequantizes at
every call before an ordinary matmul: correct everywhere, but slower, and it says so once on stderr.

A stored (exported) int4 weight is in the "tiles64" layout (`tile_int4`), which is the CPU kernel's
own on an AVX512 CPU: such a CPU uses the stored bytes as they are (memory-mapped, no copy); an AVX2
CPU's kernel reads tiles of 32 (a byte shuffle at load); a GPU repacks them with torch's packer.

The activations and scales are in the model's dtype (`--dtype`). The backward (QLoRA) gives the
input its gradient through the dequantized weight and the frozen weight none.
"""

import functools
import math
import sys
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llavarad.errors import first_line

MODES = ("int8", "int4")
# The linear layers of the decoder blocks: 97% of the 7B weights. The embeddings and lm_head stay
# in the model dtype (BENCHMARKS.md measures what quantizing lm_head would give).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 128
# From this many rows (a prefill) a CPU layer is dequantized into the activation dtype, one layer at
# a time, and multiplied by the dense matmul: the packed kernels are fast for a few rows only
# (BENCHMARKS.md measures the crossing).
DENSE_ROWS = 32
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


def int4_group(K: int, group: int = GROUP_SIZE) -> int:
    """The group size for in_features K: `group`, or the largest that divides K (said once)."""
    if K % group == 0:
        return group
    g = math.gcd(group, K)
    say_once(f"int4: in_features {K} is not a multiple of the group size {group}; groups of {g} for those layers")
    return g


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


TILE = 64  # rows per tile of the stored int4 layout, "tiles64"


def tile_int4(q: Tensor, tile: int = TILE) -> Tensor:
    """The tiled int4 layout of torch's CPU packer: q (N, K) in 0..15, N a multiple of 16 -> (N, K/2)
    uint8. Rows in tiles of `tile`, each tile k-major (K, tile/2) bytes, byte i = row i | row i + tile/2
    << 4; a last tile of fewer rows is k-major with byte j = row 2j | row 2j + 1 << 4. The kernel of
    an AVX512 CPU reads tiles of 64 (the stored layout, "tiles64"), of an AVX2 CPU tiles of 32
    (`_cpu_tile` asks torch's packer at run time)."""
    N, K = q.shape
    if N % 16:
        raise ValueError(f"int4: out_features {N} is not a multiple of 16")
    q = q.to(torch.uint8)
    full = N - N % tile
    body = q[:full].view(full // tile, 2, tile // 2, K)  # (T, 2, tile/2, K)
    body = (body[:, 0] | body[:, 1] << 4).transpose(1, 2)  # (T, K, tile/2)
    tail = q[full:].view(-1, 2, K)  # (r/2, 2, K)
    tail = (tail[:, 0] | tail[:, 1] << 4).t()  # (K, r/2)
    return torch.cat([body.reshape(-1), tail.reshape(-1)]).view(N, K // 2)


def untile_int4(t: Tensor, tile: int = TILE) -> Tensor:
    """The inverse of tile_int4: (N, K/2) uint8 -> q (N, K) uint8."""
    N, K = t.shape[0], t.shape[1] * 2
    full = N - N % tile
    flat = t.reshape(-1)
    body = flat[: full * K // 2].view(full // tile, K, tile // 2).transpose(1, 2)  # (T, tile/2, K)
    tail = flat[full * K // 2 :].view(K, -1).t()  # (r/2, K)
    return torch.cat([torch.cat([body & 15, body >> 4], 1).reshape(full, K),
                      torch.stack([tail & 15, tail >> 4], 1).reshape(N - full, K)])


def dequantize_tiles(t: Tensor, scales_and_zeros: Tensor, dtype: torch.dtype, out: Tensor | None = None,
                     tile: int = TILE) -> Tensor:
    """Tiled int4 (N, K/2) (see tile_int4) + scales_and_zeros (K/group, N, 2) -> W (N, K) in `dtype`,
    equal to dequantize_int4(untile_int4(t, tile), ...).to(dtype) (bf16: bit for bit). Built as W^T
    (K, N) and returned transposed: a tile's rows are contiguous along N, and so are the scales. `out`:
    K * N elements to build it in (a reused buffer spares the page faults of a fresh one, a third of
    the time at 7B). One group of K rows at a time, so its bytes and its rows of W stay in cache: the
    nibbles are split in the stored order (long contiguous runs), then copied into place and scaled."""
    N, K = t.shape[0], t.shape[1] * 2
    if N % tile:
        return dequantize_int4(untile_int4(t, tile), scales_and_zeros).to(dtype)
    s, z = scales_and_zeros.to(dtype).permute(2, 0, 1).contiguous()  # (G, N) each, contiguous: addcmul then vectorizes
    G, T, half = s.shape[0], N // tile, tile // 2
    rows = K // G
    tiles = t.view(T, K, half)  # byte i of (tile, k) = row i | row i + half << 4
    w = (torch.empty(K * N, dtype=dtype, device=t.device) if out is None else out).view(K, N)
    x = torch.empty(T, rows, half, dtype=torch.uint8)
    lo, hi = torch.empty_like(x, dtype=torch.int8), torch.empty_like(x, dtype=torch.int8)
    for g in range(G):
        # q ^ 8 read as a signed nibble is q - 8: an arithmetic shift of the byte (hi) or of the
        # byte shifted left by 4 (lo) sign-extends it.
        torch.bitwise_xor(tiles[:, g * rows : (g + 1) * rows], 0x88, out=x)
        torch.bitwise_right_shift(x.view(torch.int8), 4, out=hi)
        torch.bitwise_left_shift(x, 4, out=lo.view(torch.uint8)).view(torch.int8).bitwise_right_shift_(4)
        wg = w[g * rows : (g + 1) * rows]  # (rows, N)
        wg.view(rows, T, 2, half)[:, :, 0].copy_(lo.transpose(0, 1))  # the first half of each tile's rows
        wg.view(rows, T, 2, half)[:, :, 1].copy_(hi.transpose(0, 1))  # the second half
        torch.addcmul(z[g], wg, s[g], out=wg)  # (q - 8) s + z in float32, as the reference, then in dtype
    return w.t()


@functools.cache
def _cpu_tile() -> int | None:
    """The tile width of this CPU's int4 kernel layout where it is tile_int4's (64 with AVX512, 32 with
    AVX2: torch picks its kernels by the CPU's vector width), else None. Asked of torch's packer once."""
    q = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return next((t for t in (64, 32) if torch.equal(packed, tile_int4(q, t))), None)


class QuantLinear(nn.Module):
    """A bias-free linear layer y = x W^T with W quantized. Buffers: `weight` (the packed codes, in the
    kernel's layout or the plain one) and `scales` (int8: (N,); int4: scales_and_zeros (K/group, N, 2))."""

    def __init__(self, weight: Tensor, scales: Tensor, mode: str, in_features: int, out_features: int,
                 group: int, kernel: str | None):
        super().__init__()
        self.mode, self.in_features, self.out_features, self.group = mode, in_features, out_features, group
        self.kernel = kernel  # "int8", "int4_cpu", "int4_cuda", or None: dequantize then matmul
        self.tile = _cpu_tile() if kernel == "int4_cpu" else None  # the CPU kernel's layout is tile_int4's: it unpacks
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
            return cls._checked(q, s, mode, K, N, 0, "int8")
        group = int4_group(K, group)
        q, sz = quantize_int4(w, group, dtype)
        if trainable_input:
            return cls(pack_nibbles(q), sz, mode, K, N, group, None)
        return cls._packed_int4(q, sz, group)

    @classmethod
    def from_stored(cls, weight: Tensor, scales: Tensor, mode: str, device: torch.device | str,
                    dtype: torch.dtype) -> "QuantLinear":
        """A layer from its stored tensors (an export): int8 q (N, K) and scales (N,); int4 tiles64
        (N, K/2) (see tile_int4) and scales_and_zeros (K/group, N, 2). int8, and int4 on a CPU whose
        kernel reads tiles64 (AVX512), are used as they are (memory-mapped: no copy); int4 is
        re-tiled for an AVX2 CPU (a byte shuffle) and repacked by torch's packer elsewhere."""
        N, K = weight.shape[0], weight.shape[1] * (2 if mode == "int4" else 1)
        device, scales = torch.device(device), scales.to(device=device, dtype=dtype)
        if mode == "int8":
            weight = weight.to(device)
            if weight.data_ptr() % 64:  # the CPU int8 kernel crashes on a weight that is not 16-byte aligned
                weight = weight.clone()  # (an export aligns its tensors: see export._save_aligned)
            return cls._checked(weight, scales, mode, K, N, 0, "int8")
        group = K // scales.shape[0]
        tile = _cpu_tile() if device.type == "cpu" else None
        if tile == TILE:
            return cls._checked(weight, scales, mode, K, N, group, "int4_cpu")
        q = untile_int4(weight.to(device))  # (N, K) uint8
        if tile:
            return cls._checked(tile_int4(q, tile), scales, mode, K, N, group, "int4_cpu", plain=q)
        return cls._packed_int4(q.to(torch.int32), scales, group)

    @classmethod
    def _packed_int4(cls, q: Tensor, scales: Tensor, group: int) -> "QuantLinear":
        """q (N, K) int32 0..15 on its device -> the layer with the device's int4 kernel (or the fallback)."""
        kernel = "int4_cuda" if q.device.type == "cuda" else "int4_cpu"
        packed = _pack_int4(q, kernel)
        N, K = q.shape
        return cls._checked(packed if packed is not None else pack_nibbles(q), scales, "int4", K, N, group, kernel, plain=q)

    @classmethod
    def _checked(cls, weight: Tensor, scales: Tensor, mode: str, K: int, N: int, group: int, kernel: str,
                 plain: Tensor | None = None) -> "QuantLinear":
        """The layer with its kernel, or, where the kernel rejects this device, dtype or shape (a trial
        matmul says so), the plain layout dequantized at every call (one line on stderr, once)."""
        layer = cls(weight, scales, mode, K, N, group, kernel)
        try:
            with torch.no_grad():
                layer.matmul(torch.zeros(1, K, dtype=scales.dtype, device=weight.device))
            return layer
        except (RuntimeError, NotImplementedError) as e:
            say_once(f"{mode}: no packed kernel for {weight.device.type} {scales.dtype} {(N, K)} here ({first_line(e)}); "
                     f"dequantizing at every call instead (correct, slower)")
        if mode == "int4":
            weight = pack_nibbles(plain if plain is not None else untile_int4(weight))
        return cls(weight, scales, mode, K, N, group, None)

    @property
    def gives_gradients(self) -> bool:
        """Whether the backward can have W: every layout unpacks but the int4 kernels' tiled ones other
        than tile_int4's (the CUDA kernel's, and that of a CPU with neither AVX512 nor AVX2)."""
        return self.mode == "int8" or self.kernel is None or self.tile is not None

    def dequantized(self, out: Tensor | None = None) -> Tensor:
        """W as the forward uses it, (N, K) in the activation dtype, built in `out` (N * K elements)
        where given. The int8, plain and tile_int4 (the CPU kernel's) layouts unpack; the CUDA kernel's
        tiled layout is for inference only."""
        dtype = self.scales.dtype
        if self.mode == "int8":
            w = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device) if out is None else out.view(self.weight.shape)
            return w.copy_(self.weight).mul_(self.scales[:, None])  # |q| <= 127 is exact in dtype: one rounding
        if self.kernel is None:
            q = unpack_nibbles(self.weight)
        elif self.tile:
            return dequantize_tiles(self.weight, self.scales, dtype, out, self.tile)
        else:
            raise NotImplementedError(f"int4 weights packed for the {self.weight.device.type} kernel here have no gradient "
                                      f"path; quantize with trainable_input=True for training")
        return dequantize_int4(q, self.scales).to(dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """x (M, K) in the activation dtype -> (M, N)."""
        if x.shape[0] >= DENSE_ROWS and (self.kernel == "int8" or self.tile):
            return F.linear(x, self.dequantized(_scratch(self.out_features * self.in_features, x.dtype, x.device)))
        if self.kernel == "int8":
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        if self.kernel == "int4_cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scales)
        if self.kernel == "int4_cuda":
            return torch._weight_int4pack_mm(x, self.weight, self.group, self.scales)
        return F.linear(x, self.dequantized())

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N). Only an input that needs a gradient goes through the autograd
        function (its bookkeeping is 3% of a 7B decode step)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        return self.apply_to(x)

    def apply_to(self, x: Tensor) -> Tensor:
        """x (..., K) in any float dtype -> (..., N) in the activation dtype, through matmul."""
        y = self.matmul(x.reshape(-1, self.in_features).to(self.scales.dtype))  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}, kernel={self.kernel}"


_thread = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer of `numel` elements that this thread's long-input calls reuse, layer after layer: it
    grows to the largest layer (90 MB at 7B in bf16) and stays. A fresh one per call costs the page
    faults of first touch, a third of the dequantization's time at 7B on a CPU."""
    buf = getattr(_thread, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = _thread.buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


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
        return layer.apply_to(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        w = layer.dequantized()  # (N, K), only while this backward runs
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None
