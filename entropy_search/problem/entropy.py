"""Spatial entropy of activation maps (docs/design.md, "Spatial entropy") and the network's mean entropy.

Estimators, per map `A` (one image, one channel), all in nats:

- ``cooccurrence`` (default): min-max normalise `A` to [0, 1] (a constant map has entropy 0), quantise
  into `G` levels (level = min(floor(G * a), G - 1)), count the ordered pairs (level at s, level of its
  right neighbour) and (level at s, level of the neighbour below) in one G x G matrix, normalise it
  to `p` and return ``-sum p log p``. An i.i.d. uniform map tends to ``2 log G``; a two-level
  checkerboard gives ``log 2``; a map without neighbour pairs (1 x 1) gives 0.
- ``histogram``: the Shannon entropy of the map's G-level histogram (same quantisation).
- ``mass``: the entropy of ``p = A / sum(A)`` over positions, for non-negative maps (negative values
  are clamped to 0, as a ReLU would); an all-zero map gives 0.

A map containing NaN or infinity gives NaN, so a broken activation shows in the reward.

Speed (the estimator must cost less than the forward pass it measures; bench/bench_entropy.py):

- CPU / PyTorch path: levels are computed once per map (int32); both neighbour directions are written
  into one int32 key buffer ``map * G^2 + G * level + neighbour_level`` and counted by one
  ``bincount`` per chunk of maps; ``sum c log c`` comes from a lookup table (counts are integers), so
  ``H = log n - sum(c log c) / n`` needs no per-bin logarithm. Maps smaller than their G^2 bins
  (2x2, 3x3) are counted by comparing their few codes with each other instead. Scratch buffers are
  reused across layers and calls (`Workspace`): fresh multi-megabyte temporaries are page-faulted in
  on every call and cost more than the arithmetic. No Python loop over maps; a layer is split into a
  few chunks only to keep temporaries cache-sized.
- CUDA: one Triton kernel per layer (one program per map: min-max, levels, codes, histogram,
  entropy), falling back to the PyTorch path (``index_add_`` instead of ``bincount``, no host sync)
  for large maps or when Triton is missing or fails.
- Fewer maps: `EntropyProbe`'s ``sample`` measures a fixed, seeded fraction of each layer's maps.

`EntropyProbe` measures the network's mean entropy during a forward pass that is already happening
(hooks compute the entropy of each measured layer at once and keep running sums only);
`network_entropy` runs one forward under ``torch.no_grad`` with a probe attached.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import EntropySearchError

METHODS = ("cooccurrence", "histogram", "mass")
LAYER_CHOICES = ("bn", "bn_relu", "last_stage")
MAX_BINS = 4096
# Default fraction of each layer's maps that the network's entropy measures (fixed, seeded maps; see
# EntropyProbe). On the project's 2-core CPU (ResNet-56 and VGG-16-BN, all BN outputs, batch 64) the
# exact estimator (1.0) costs about 1.4-2.6 and 0.9-1.0 forward passes, 0.5 about 0.8-1.4 and 0.55,
# 0.25 about 0.5-0.8 and 0.3 (shared, noisy machine; bench/bench_entropy.py). Over 10 random masked
# candidates, 0.25 stayed within 0.0018 nats of the exact values (their spread: 0.14 and 0.38 nats)
# with Spearman rank correlation 0.988 and 1.0.
# On CUDA the Triton kernel makes the exact estimator cheaper than sampling (ResNet-56 on an H200, batch
# 256: exact 1.2 forward passes, 0.25 sampled 2.9: the sampled maps' gather and top-k cost more than
# the maps), so the default (`sample=None`) is exact there.
DEFAULT_SAMPLE = 0.25
CUDA_DEFAULT_SAMPLE = 1.0
_CHUNK_KEYS = 1 << 20  # per pass on CPU (x64 on GPUs): keys, bins or compared pairs; keeps temporaries cache-sized

__all__ = [
    "CUDA_DEFAULT_SAMPLE",
    "DEFAULT_SAMPLE",
    "LAYER_CHOICES",
    "METHODS",
    "EntropyProbe",
    "measured_layers",
    "network_entropy",
    "spatial_entropy",
]


# ---------------------------------------------------------------- per-map estimators


def spatial_entropy(act: Tensor, bins: int = 16, method: str = "cooccurrence", *, relu: bool = False) -> Tensor:
    """Per-map spatial entropy in nats of activations ``[B, C, H, W]`` -> ``[B, C]`` (see module doc).

    ``relu=True`` measures ``clamp(act, min=0)`` (free: folded into the quantisation). The result is
    float64 for float64 input and float32 otherwise, on the input's device.
    """
    _check_act(act)
    _check_estimator(bins, method)
    b, c, h, w = act.shape
    out_dtype = torch.float64 if act.dtype == torch.float64 else torch.float32
    if act.numel() == 0:
        return torch.zeros(b, c, dtype=out_dtype, device=act.device)
    maps = act.detach().reshape(b * c, h * w).contiguous()
    with torch.no_grad():
        per_map = _triton_entropy(maps, None, h, w, bins, method, relu)
        if per_map is None:
            ws = Workspace()
            per_map = torch.cat(
                [_entropy(part, h, w, bins, method, relu, ws, per_map=True) for part in _chunks(maps, h, w, bins, method)]
            )
    return per_map.to(out_dtype).view(b, c)


class Workspace:
    """Reusable scratch buffers, grown on demand, so that repeated measurements allocate nothing large.

    Why: on CPU, fresh multi-megabyte temporaries are page-faulted in on every call (the C allocator
    hands large blocks back to the system); reusing them made the estimator ~2.5x faster on ResNet-56.
    One workspace per probe; not shared between threads.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._offsets: dict[tuple[int, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of `shape` backed by the buffer `name` (contents are not kept)."""
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def offsets(self, m: int, stride: int, device: torch.device) -> Tensor:
        """``[0, stride, ..., (m-1)*stride]`` as int32: the first bin of each map in a flat count buffer."""
        buf = self._offsets.get((stride, device))
        if buf is None or buf.numel() < m:
            buf = self._offsets[(stride, device)] = torch.arange(0, m * stride, stride, dtype=torch.int32, device=device)
        return buf[:m]


def _entropy_sum(maps: Tensor, h: int, w: int, bins: int, method: str, relu: bool, ws: Workspace | None = None) -> Tensor:
    """Sum of the entropies of ``maps [M, H*W]`` as a float64 scalar on their device (no host sync)."""
    ws = ws or Workspace()
    total = torch.zeros((), dtype=torch.float64, device=maps.device)
    for part in _chunks(maps, h, w, bins, method):
        total = total + _entropy(part, h, w, bins, method, relu, ws, per_map=False)
    return total


def _outcomes(h: int, w: int, bins: int, method: str) -> tuple[int, int]:
    """(outcomes counted per map, bins per map): neighbour pairs and G^2, or positions and G."""
    if method == "histogram":
        return h * w, bins
    return h * (w - 1) + (h - 1) * w, bins * bins


def _pairwise(n: int, k: int) -> bool:
    """Count by comparing a map's codes with each other when that is cheaper than `k` dense bins."""
    return n * n <= k


def _chunks(maps: Tensor, h: int, w: int, bins: int, method: str) -> Iterable[Tensor]:
    """Split the maps so that one pass's temporaries stay bounded (and cache-sized on CPU)."""
    n, k = _outcomes(h, w, bins, method)
    per_map = h * w if method == "mass" else n * n if _pairwise(n, k) else max(h * w, n, 2 * k)
    budget = _CHUNK_KEYS if maps.device.type == "cpu" else _CHUNK_KEYS * 64
    step = max(1, budget // max(1, per_map))
    return maps.split(step) if maps.shape[0] > step else (maps,)


def _entropy(
    maps: Tensor, h: int, w: int, bins: int, method: str, relu: bool, ws: Workspace, *, per_map: bool
) -> Tensor:
    """Entropies of ``maps [M, H*W]`` (float64 ``[M]``), or their sum when ``per_map`` is False.

    With ``n`` outcomes per map (pairs or positions) and counts ``c`` over the bins,
    ``H = log n - sum(c log c) / n``.
    """
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()  # integers, and half/bfloat16 that lack the precision to quantise faithfully
    if method == "mass":
        ent = _mass_entropy(maps)
        return ent if per_map else ent.sum()
    m = maps.shape[0]
    n, k = _outcomes(h, w, bins, method)
    levels, finite = _quantise(maps, bins, relu, ws)
    if n == 0:  # 1 x 1 maps have no neighbour pairs: a single outcome, entropy 0
        clogc = torch.zeros(m if per_map else (), dtype=torch.float64, device=maps.device)
    elif _pairwise(n, k):
        clogc = _clogc_pairwise(_codes(levels, h, w, bins, method, None, ws), per_map, ws)
    else:
        keys = _codes(levels, h, w, bins, method, ws.offsets(m, k, maps.device), ws)
        clogc = _clogc_dense(_bincount(keys.view(-1), m * k, ws), m, n, per_map, ws)
    log_n = math.log(n) if n else 0.0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=maps.device)
    if per_map:
        ent = (log_n - clogc / max(n, 1)).clamp_(min=0)
        return torch.where(finite, ent, nan)
    return torch.where(finite.all(), m * log_n - clogc / max(n, 1), nan)


def _quantise(maps: Tensor, bins: int, relu: bool, ws: Workspace) -> tuple[Tensor, Tensor]:
    """Per-map min-max normalisation and quantisation to int32 levels in [0, bins); also which maps are finite.

    level = min(floor(bins * (a - min) / (max - min)), bins - 1), computed as ``(a - min) * (bins / span)``.
    With ``relu`` the map is clamp(min=0)'d first; that only moves min and max to >= 0 (values below
    the new minimum fall to level 0 through the clamp), so it costs nothing extra.
    """
    lo = maps.amin(1, keepdim=True)
    hi = maps.amax(1, keepdim=True)
    if relu:
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    span = hi - lo
    finite = torch.isfinite(span).view(-1)
    scale = torch.nan_to_num(bins / span, nan=0.0, posinf=0.0, neginf=0.0)  # constant map: all at level 0
    scaled = torch.sub(maps, lo, out=ws.get("scaled", tuple(maps.shape), maps.dtype, maps.device)).mul_(scale)
    levels = ws.get("levels", tuple(maps.shape), torch.int32, maps.device)
    return levels.copy_(scaled).clamp_(0, bins - 1), finite  # copy_ truncates like .to(int32)


def _codes(
    levels: Tensor, h: int, w: int, bins: int, method: str, offsets: Tensor | None, ws: Workspace
) -> Tensor:
    """Int32 codes ``[M, n]`` of each map's outcomes, plus the map's first bin when `offsets` is given.

    Co-occurrence: ``bins * level(s) + level(neighbour)`` for the right neighbours, then the ones
    below, written into one buffer (both directions are counted in one pass).
    """
    m = levels.shape[0]
    if method == "histogram":
        if offsets is None:
            return levels
        return torch.add(levels, offsets.view(m, 1), out=ws.get("codes", tuple(levels.shape), torch.int32, levels.device))
    grid = levels.view(m, h, w)
    first = ws.get("first", (m, h, w), torch.int32, levels.device)
    if offsets is None:
        torch.mul(grid, bins, out=first)
    else:
        torch.add(offsets.view(m, 1, 1), grid, alpha=bins, out=first)
    n_right = h * (w - 1)
    codes = ws.get("codes", (m, n_right + (h - 1) * w), torch.int32, levels.device)
    torch.add(first[:, :, :-1], grid[:, :, 1:], out=codes[:, :n_right].view(m, h, w - 1))
    torch.add(first[:, :-1, :], grid[:, 1:, :], out=codes[:, n_right:].view(m, h - 1, w))
    return codes


def _bincount(keys: Tensor, size: int, ws: Workspace) -> Tensor:
    """Counts of int32 keys in ``[0, size)``; CPU: one serial bincount pass, CUDA: atomics without a host sync."""
    if keys.device.type == "cpu":
        return torch.bincount(keys, minlength=size)
    counts = ws.get("counts", (size,), torch.int32, keys.device).zero_()
    return counts.index_add_(0, keys, torch.ones(1, dtype=torch.int32, device=keys.device).expand(keys.numel()))


def _clogc_dense(counts: Tensor, m: int, n: int, per_map: bool, ws: Workspace) -> Tensor:
    """``sum(c log c)`` over each map's bins of the flat counts ``[M * K]`` (float64 ``[M]`` or their sum)."""
    if counts.device.type == "cpu":
        clogc = torch.take(_clogc_table(n), counts, out=ws.get("clogc", tuple(counts.shape), torch.float64, counts.device))
    else:
        c = counts.double()
        clogc = torch.special.xlogy(c, c)
    return clogc.view(m, -1).sum(1) if per_map else clogc.sum()


def _clogc_pairwise(codes: Tensor, per_map: bool, ws: Workspace) -> Tensor:
    """``sum(c log c)`` for small maps without bins: each outcome adds the log of how often its code occurs."""
    m, n = codes.shape
    same = torch.eq(codes.unsqueeze(2), codes.unsqueeze(1), out=ws.get("same", (m, n, n), torch.bool, codes.device))
    logs = same.sum(2).double().log_()
    return logs.sum(1) if per_map else logs.sum()


@functools.lru_cache(maxsize=64)
def _clogc_table(n: int) -> Tensor:
    """``c log c`` for c = 0..n (float64, CPU), cached per n."""
    c = torch.arange(n + 1, dtype=torch.float64)
    return torch.special.xlogy(c, c)


def _mass_entropy(maps: Tensor) -> Tensor:
    """Entropy of ``p = A / sum(A)`` over positions of each map (negatives clamped to 0; all-zero -> 0)."""
    mass = maps.clamp(min=0)
    total = mass.sum(1, keepdim=True)
    p = mass.div_(torch.where(total > 0, total, torch.ones_like(total)))
    return (-torch.special.xlogy(p, p).sum(1)).double().clamp_(min=0)


def _check_act(act: Tensor) -> None:
    if not isinstance(act, Tensor):
        raise EntropySearchError(f"activations must be a torch.Tensor, got {type(act).__name__}")
    if act.dim() != 4:
        raise EntropySearchError(f"activations must be 4-D [B, C, H, W], got shape {tuple(act.shape)}")
    if act.is_complex():
        raise EntropySearchError("activations must be real, got a complex tensor")


def _check_estimator(bins: int, method: str) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise EntropySearchError(f"bins must be an integer in [2, {MAX_BINS}], got {bins!r}")
    if method not in METHODS:
        raise EntropySearchError(f"unknown entropy method {method!r}; known: {', '.join(METHODS)}")


# ---------------------------------------------------------------- CUDA: one Triton kernel per layer

_TRITON_MAX_BLOCK = 4096  # positions per map held by one program; larger maps use the PyTorch path
_TRITON_MAX_BINS = 1024  # bins per map (G^2 or G) held in one program's histogram
_TRITON_DEVICES = ("cuda",)
_triton_state: dict[str, object] = {}


def _triton_entropy(
    flat: Tensor, index: Tensor | None, h: int, w: int, bins: int, method: str, relu: bool
) -> Tensor | None:
    """Per-map entropies (float32) of the rows `index` (all if None) of CUDA maps ``flat [N, H*W]``.

    One program per map does the whole estimator (min-max, levels, neighbour codes, histogram,
    entropy) in one launch per layer, which the ~20 launches of the PyTorch path cannot match on a
    GPU. None when it does not apply (CPU, mass estimator, large maps or bins, no Triton) or when
    Triton failed once in this process (then a warning says so and the PyTorch path is used).
    """
    k = bins if method == "histogram" else bins * bins
    block = 1 << max(4, (h * w - 1).bit_length())
    if flat.device.type not in _TRITON_DEVICES or method == "mass" or block > _TRITON_MAX_BLOCK or k >= _TRITON_MAX_BINS:
        return None
    kernel = _triton_kernel()
    if kernel is None:
        return None
    n = h * w if method == "histogram" else h * (w - 1) + (h - 1) * w
    m = flat.shape[0] if index is None else index.numel()
    out = torch.empty(m, dtype=torch.float32, device=flat.device)
    if m == 0:
        return out
    try:
        kernel[(m,)](
            flat, flat if index is None else index, out, h, w, h * w, math.log(n) if n else 0.0, float(max(n, 1)),
            G=bins, K=k, NB=1 << k.bit_length(), BLOCK=block, HAS_INDEX=index is not None, RELU=relu,
            HISTOGRAM=method == "histogram", UPCAST=flat.dtype not in (torch.float32, torch.float64), F64=flat.dtype == torch.float64,
            num_warps=max(1, min(8, block // 256)),
        )
    except Exception as exc:  # a Triton build problem must not break the search: fall back, once, loudly
        import warnings

        _triton_state["kernel"] = None
        warnings.warn(f"Triton entropy kernel failed ({exc!r}); using the PyTorch path", RuntimeWarning, stacklevel=2)
        return None
    return out


def _triton_kernel():
    """The jitted kernel, built on first use (Triton is imported only when CUDA maps are measured)."""
    if "kernel" in _triton_state:
        return _triton_state["kernel"]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _triton_state["kernel"] = None
        return None

    @triton.jit
    def spatial_entropy_kernel(
        x_ptr, index_ptr, out_ptr, H, W, HW, log_n, n,
        G: tl.constexpr, K: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, HAS_INDEX: tl.constexpr,
        RELU: tl.constexpr, HISTOGRAM: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if HAS_INDEX:
            row = tl.load(index_ptr + pid).to(tl.int64)
        else:
            row = pid.to(tl.int64)
        base = x_ptr + row * HW
        offs = tl.arange(0, BLOCK)
        valid = offs < HW
        x = tl.load(base + offs, mask=valid, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        nans = tl.sum(((x != x) & valid).to(tl.int32), axis=0)
        lo = tl.min(tl.where(valid, x, float("inf")), axis=0)
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=0)
        if RELU:
            lo = tl.maximum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
        span = hi - lo
        finite = (span < float("inf")) & (nans == 0)
        if F64:
            scale = tl.where(span > 0, G / span, 0.0)
        else:  # IEEE division, as PyTorch's, so that levels match the CPU path bit for bit
            scale = tl.where(span > 0, tl.math.div_rn(tl.full((), G, tl.float32), span), 0.0)
        scale = tl.where(finite, scale, 0.0)
        level = tl.minimum(tl.maximum((x - lo) * scale, 0.0), G - 1.0).to(tl.int32)
        if HISTOGRAM:
            counts = tl.histogram(tl.where(valid, level, K), NB)
        else:
            col = offs % W
            right_ok = valid & (col < W - 1)
            down_ok = valid & (offs < HW - W)
            xr = tl.load(base + offs + 1, mask=right_ok, other=0.0)
            xd = tl.load(base + offs + W, mask=down_ok, other=0.0)
            if UPCAST:
                xr = xr.to(tl.float32)
                xd = xd.to(tl.float32)
            right = tl.minimum(tl.maximum((xr - lo) * scale, 0.0), G - 1.0).to(tl.int32)
            down = tl.minimum(tl.maximum((xd - lo) * scale, 0.0), G - 1.0).to(tl.int32)
            counts = tl.histogram(tl.where(right_ok, level * G + right, K), NB)
            counts += tl.histogram(tl.where(down_ok, level * G + down, K), NB)
        c = counts.to(tl.float32)
        clogc = tl.where((tl.arange(0, NB) < K) & (c > 0), c * tl.log(tl.maximum(c, 1.0)), 0.0)
        ent = tl.maximum(log_n - tl.sum(clogc, axis=0) / n, 0.0)
        tl.store(out_ptr + pid, tl.where(finite, ent, float("nan")))

    _triton_state["kernel"] = spatial_entropy_kernel
    return spatial_entropy_kernel


# ---------------------------------------------------------------- the network's entropy


def measured_layers(model: nn.Module, layers: str | Sequence[str] = "bn") -> list[str]:
    """Names of the modules whose outputs are measured: every BatchNorm2d for the named choices, or a list.

    ``'last_stage'`` starts from every BatchNorm2d; the probe narrows it to the last spatial
    resolution after its first forward pass.
    """
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise EntropySearchError(
                f"unknown layer choice {layers!r}; use one of {', '.join(LAYER_CHOICES)} or a list of module names"
            )
        names = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm)]
        if not names:
            raise EntropySearchError("the model has no BatchNorm2d layer to measure; pass a list of module names")
        return names
    names = list(layers)
    if not names:
        raise EntropySearchError("the list of measured layers is empty")
    unknown = [n for n in names if not isinstance(n, str) or n not in modules]
    if unknown:
        raise EntropySearchError(f"no module named {', '.join(map(repr, unknown))} in the model")
    return list(dict.fromkeys(names))


class EntropyProbe:
    """Forward hooks that add up the spatial entropy of the measured layers' outputs (running sums only).

    ``kept`` maps a measured layer's name to the indices of its kept channels (masked evaluation: the
    others are not counted); layers not in it count all their channels, so a physically pruned model
    needs no ``kept``. ``sample`` in (0, 1] measures only ``ceil(sample * maps)`` of each layer's
    (kept) maps, the ones with the smallest fixed uniforms (drawn from ``seed`` and the layer name),
    so that candidates are compared on the same maps; 1.0 is the exact estimator; None (the default)
    is `DEFAULT_SAMPLE` on the CPU and `CUDA_DEFAULT_SAMPLE` (exact) on CUDA, what meets the speed
    target on each (see their comment).

    Usage: ``with EntropyProbe(model) as probe: model(x)`` then ``probe.value()``. The model's mode is
    left alone (call ``model.eval()`` for fixed BN statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "bn",
        *,
        bins: int = 16,
        method: str = "cooccurrence",
        relu: bool | None = None,
        kept: Mapping[str, Tensor | Sequence[int]] | None = None,
        sample: float | None = None,
        seed: int = 0,
    ) -> None:
        _check_estimator(bins, method)
        if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int | float) or not 0 < sample <= 1):
            raise EntropySearchError(f"sample must be a fraction in (0, 1] (or None: the device's default), got {sample!r}")
        self.model = model
        self.layers = measured_layers(model, layers)
        self.last_stage = layers == "last_stage"
        self.relu = (layers == "bn_relu") if relu is None else bool(relu)
        self.bins, self.method, self.seed = bins, method, int(seed)
        self.sample = None if sample is None else float(sample)
        self._modules = dict(model.named_modules())
        self._kept: dict[str, Tensor] = {}
        self._kept_on: dict[tuple[str, torch.device], Tensor] = {}
        self._uniform: dict[tuple[str, int, int, torch.device], Tensor] = {}
        self._handles: list = []
        self._ws = Workspace()
        self._active: set[str] | None = None
        self._resolution: dict[str, tuple[int, int]] = {}
        self._last: str | None = None
        self.set_kept(kept)
        self.reset()

    # -- state

    def set_kept(self, kept: Mapping[str, Tensor | Sequence[int]] | None) -> EntropyProbe:
        """Set the kept channels per layer (None: all channels); keys must name modules of the model."""
        self._kept, self._kept_on = {}, {}
        for name, idx in (kept or {}).items():
            if name not in self._modules:
                raise EntropySearchError(f"kept channels given for {name!r}, which is not a module of the model")
            t = torch.as_tensor(idx).detach().to("cpu")
            if t.dtype == torch.bool:
                t = t.nonzero().view(-1)
            if t.dim() != 1 or (t.numel() and (t.is_floating_point() or int(t.min()) < 0)):
                raise EntropySearchError(f"kept channels of {name!r} must be a 1-D tensor of channel indices")
            self._kept[name] = torch.unique(t.long())
        return self

    def reset(self) -> EntropyProbe:
        """Forget the sums measured so far (the layer choice and kept channels stay)."""
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        return self

    @property
    def count(self) -> int:
        """Number of maps measured since the last reset, over the layers `value` averages."""
        return sum(self._counts[n] for n in self._included())

    def value(self) -> float:
        """Mean entropy (nats) over the measured maps since the last reset."""
        names = [n for n in self._included() if self._counts[n]]
        count = sum(self._counts[n] for n in names)
        if not count:
            raise EntropySearchError("no activation map was measured: run a forward pass with the probe attached")
        return float(torch.stack([self._sums[n] for n in names]).sum()) / count

    def normalized_value(self) -> float | None:
        """Mean over the measured maps of each map's entropy divided by the most its layer's maps can have:
        log(min(outcomes, bins)) (neighbour pairs and G^2 for co-occurrence, positions and G for the
        histogram, log(positions) for mass). Frees the mean of the cap small late-stage maps put on it.
        None when no measured layer's maps can have any entropy (1 x 1)."""
        total, count = 0.0, 0
        for name in self._included():
            if not self._counts[name]:
                continue
            h, w = self._resolution[name]
            outcomes, bins = _outcomes(h, w, self.bins, self.method)
            cap = math.log(h * w) if self.method == "mass" else math.log(min(outcomes, bins)) if outcomes > 0 else 0.0
            if cap <= 0:
                continue
            total += float(self._sums[name]) / cap
            count += self._counts[name]
        return total / count if count else None

    def per_layer(self) -> dict[str, float]:
        """Mean entropy of each measured layer (for logging which layers drive the value)."""
        return {n: float(self._sums[n]) / self._counts[n] for n in self._included() if self._counts[n]}

    def _included(self) -> list[str]:
        if not self.last_stage or self._last is None:
            return list(self._sums)
        last = self._resolution[self._last]
        return [n for n in self._sums if self._resolution.get(n) == last]

    # -- hooks

    def attach(self) -> EntropyProbe:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            for name in self.layers:
                self._handles.append(self._modules[name].register_forward_hook(self._hook(name)))
            if self.last_stage:
                self._handles.append(self.model.register_forward_hook(self._end_of_forward))
        return self

    def detach(self) -> EntropyProbe:
        """Remove the hooks; the sums stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self

    def __enter__(self) -> EntropyProbe:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _end_of_forward(self, module: nn.Module, inputs, output) -> None:
        """After the first full forward, measure only the layers at the last layer's resolution."""
        if self._active is None and self._last is not None:
            last = self._resolution[self._last]
            self._active = {n for n, r in self._resolution.items() if r == last}

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if self._active is not None and name not in self._active:
                return
            self._measure(name, output)

        return hook

    def _measure(self, name: str, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise EntropySearchError(f"layer {name!r} does not output a 4-D [B, C, H, W] tensor")
        act = output.detach()
        b, c, h, w = act.shape
        self._resolution[name] = (h, w)
        self._last = name
        index = self._map_index(name, b, c, act.device)
        flat = act.reshape(b * c, h * w).contiguous()
        count = b * c if index is None else index.numel()
        with torch.no_grad():
            per_map = _triton_entropy(flat, index, h, w, self.bins, self.method, self.relu) if count else None
            if per_map is not None:
                s = per_map.sum(dtype=torch.float64)
            elif count:
                if index is None:
                    maps = flat
                else:
                    maps = torch.index_select(flat, 0, index, out=self._ws.get("selected", (count, h * w), flat.dtype, flat.device))
                s = _entropy_sum(maps, h, w, self.bins, self.method, self.relu, self._ws)
            else:
                s = torch.zeros((), dtype=torch.float64, device=act.device)
        self._sums[name] = self._sums[name] + s if name in self._sums else s
        self._counts[name] = self._counts.get(name, 0) + count

    def _map_index(self, name: str, b: int, c: int, device: torch.device) -> Tensor | None:
        """Rows of ``act.reshape(B*C, H*W)`` to measure (kept channels, sampled maps); None for all."""
        channels = self._kept.get(name)
        if channels is not None:
            if channels.numel() and int(channels[-1]) >= c:
                raise EntropySearchError(
                    f"kept channel {int(channels[-1])} of {name!r} is out of range: the layer has {c} channels"
                )
            key = (name, device)
            if key not in self._kept_on:
                self._kept_on[key] = channels.to(device)
            channels = self._kept_on[key]
        sample = self.sample_on(device)
        if sample >= 1:
            if channels is None:
                return None
            return (torch.arange(b, device=device).view(b, 1) * c + channels.view(1, -1)).view(-1)
        u = self._uniforms(name, b, c, device)
        if channels is not None:
            u = u.index_select(1, channels)
        width = u.shape[1]
        k = math.ceil(sample * b * width)
        pick = u.reshape(-1).topk(k, largest=False, sorted=False).indices.sort().values
        chan = pick % width if channels is None else channels[pick % width]
        return pick // width * c + chan

    def sample_on(self, device: torch.device | str) -> float:
        """The fraction of maps measured on `device` (the configured one, else the device's default)."""
        if self.sample is not None:
            return self.sample
        return CUDA_DEFAULT_SAMPLE if torch.device(device).type == "cuda" else DEFAULT_SAMPLE

    def _uniforms(self, name: str, b: int, c: int, device: torch.device) -> Tensor:
        """Fixed uniforms [B, C] of one layer (seeded by `seed` and the layer name), cached per shape."""
        key = (name, b, c, device)
        if key not in self._uniform:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            self._uniform[key] = torch.rand(b, c, generator=gen).to(device)
        return self._uniform[key]


def network_entropy(
    model: nn.Module,
    x: Tensor,
    *,
    layers: str | Sequence[str] = "bn",
    bins: int = 16,
    method: str = "cooccurrence",
    kept: Mapping[str, Tensor | Sequence[int]] | None = None,
    relu: bool | None = None,
    sample: float | None = None,
    seed: int = 0,
) -> float:
    """Mean spatial entropy (nats) of the measured layers' maps for batch `x`: one forward, no grad.

    See `EntropyProbe` for ``kept``, ``relu`` (default: True for ``layers='bn_relu'``), ``sample``
    and ``seed``.
    """
    probe = EntropyProbe(model, layers, bins=bins, method=method, relu=relu, kept=kept, sample=sample, seed=seed)
    with probe, torch.no_grad():
        model(x)
    return probe.value()
