"""Per-layer quantization: fake-quantized on any device, or torchao's real kernels where they exist.

Every ``nn.Linear`` and ``nn.Conv2d`` of the denoiser gets a :class:`QuantSpec`: the config's
``default``, or the ``layers`` entry whose path is the longest prefix of the layer's path (an
exact path or any module above it, e.g. ``"transformer_blocks.3.ff"``). 16 bits means "left as it
is", so a 16/16 layer is not touched at all.

Two backends:

- ``"simulated"`` measures *quality*: each quantized weight is replaced once, at apply, by its
  round-to-nearest quantized-dequantized copy (per output channel or per group, symmetric or with
  a zero point), and each quantized layer's input is fake-quantized dynamically (one range per
  tensor, or per token). It runs anywhere and any bit-width costs the same, so it says nothing
  about speed or memory.
- ``"torchao"`` measures *speed and memory* with torchao's tensor subclasses, put on each layer by
  ``torchao.quantization.quantize_``: int8 weight-only and int8 dynamic-activation + int8 weight
  on CPU and CUDA, int4 weight-only (group-wise with zero points, bfloat16) on CUDA only. A layer
  they cannot run raises :class:`~difftune.ProfileError` (``strict``) or is simulated with a
  warning (``strict=False``).

:func:`quantization_report` (and the handle's ``report``) says which path ran on every quantized
layer, so a profile's metrics can record it; :func:`weight_memory_bytes` counts what the weights
would take stored at their bit-widths.

    >>> import difftune
    >>> pipe = difftune.load_pipeline("embedded")
    >>> config = QuantConfig(default=QuantSpec(weight_bits=8),
    ...                      layers={"transformer_blocks.3.ff": QuantSpec(weight_bits=4, activation_bits=8)})
    >>> handle = config.apply(pipe)
    >>> images = pipe(prompt="digit 3").images
    >>> handle.remove()          # every weight back, bit for bit
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from difftune.accel._fields import as_int, as_str, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, wrap_forward
from difftune.accel._registry import register_technique
from difftune.errors import ProfileError

__all__ = [
    "BACKENDS",
    "QuantConfig",
    "QuantHandle",
    "QuantSpec",
    "QuantizedRows",
    "WeightMemory",
    "active_quantization",
    "apply_quantization",
    "dequantize_rows",
    "fake_quantize",
    "quantization_report",
    "quantize_rows",
    "served_weight_memory",
    "torchao_available",
    "weight_memory_bytes",
]

BACKENDS = ("simulated", "torchao")
WEIGHT_BITS = (16, 8, 4)
ACTIVATION_BITS = (16, 8)
GRANULARITIES = ("channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "token")
#: Storage assumed by :func:`weight_memory_bytes`: float32 scales (as torchao keeps them), one byte per zero point.
SCALE_BYTES = 4
ZERO_POINT_BYTES = 1
_INSTALL_HINT = "pip install --no-deps torchao (it must not replace the installed torch)"


# --- the arithmetic ------------------------------------------------------------------------------


class QuantizedRows(NamedTuple):
    """A 2-D tensor quantized row by row: ``x ≈ (q − zero_point) · scale``.

    ``q`` holds the integer levels (as floats, same shape as the input); ``scale`` and ``zero_point``
    are ``rows × groups``, each covering ``group_size`` consecutive columns (the last group may be short).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_size: int


def quantize_rows(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, group_size: int | None = None
) -> QuantizedRows:
    """Round-to-nearest quantization of a 2-D tensor, one scale per row or per ``group_size`` columns of a row.

    Symmetric: levels ``−2^(b−1) … 2^(b−1) − 1``, ``scale = max|x| / (2^(b−1) − ½)``, no zero point.
    Asymmetric: levels ``0 … 2^b − 1`` over ``[min(x, 0), max(x, 0)]`` with an integer zero point, so 0
    stays exact. Either way every value is off by at most ``scale / 2``. The arithmetic is torchao's
    (``choose_qparams_affine`` / ``quantize_affine``), so the simulated backend predicts its int8 kernels.

        >>> r = quantize_rows(torch.tensor([[0.6, -1.5, 0.25]]), bits=4)   # scale = 1.5 / 7.5 = 0.2
        >>> r.q.tolist(), [round(v, 4) for v in dequantize_rows(r)[0].tolist()]
        ([[3.0, -8.0, 1.0]], [0.6, -1.6, 0.2])
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if bits < 2:
        raise ValueError(f"quantize_rows: bits must be >= 2, got {bits}")
    rows, cols = x.shape
    size = cols if group_size is None or group_size >= cols else int(group_size)
    groups = -(-cols // size)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    # Zero padding of a short last group changes neither max|x| nor a range that already includes 0.
    xg = torch.nn.functional.pad(xf, (0, groups * size - cols)).reshape(rows, groups, size)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = xg.abs().amax(dim=-1) / ((qmax - qmin) / 2)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = xg.amin(dim=-1).clamp(max=0), xg.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / qmax
    # An all-zero group is exact with any scale; 1 avoids 0/0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.zeros_like(scale) if symmetric else torch.round(-lo / scale).clamp(qmin, qmax)
    q = torch.clamp(torch.round(xg * (1.0 / scale[..., None])) + zero[..., None], qmin, qmax)
    return QuantizedRows(q.reshape(rows, groups * size)[:, :cols], scale, zero, size)


def dequantize_rows(rows: QuantizedRows, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(q − zero_point) · scale``, in ``dtype`` (default: the dtype of ``q``)."""
    cols = rows.q.shape[1]
    scale = rows.scale.repeat_interleave(rows.group_size, dim=1)[:, :cols]
    zero = rows.zero_point.repeat_interleave(rows.group_size, dim=1)[:, :cols]
    out = (rows.q - zero) * scale
    return out if dtype is None else out.to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, *, symmetric: bool = True, group_size: int | None = None) -> torch.Tensor:
    """Quantize then dequantize a 2-D tensor row by row (see :func:`quantize_rows`); same dtype as ``x``."""
    return dequantize_rows(quantize_rows(x, bits, symmetric=symmetric, group_size=group_size), x.dtype)


def _fake_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # Conv2d weights are out × in × kh × kw: a channel is everything one output channel reads.
    group = spec.group_size if spec.granularity == "group" else None
    flat = weight.detach().reshape(weight.shape[0], -1)
    return fake_quantize(flat, spec.weight_bits, symmetric=spec.symmetric, group_size=group).reshape(weight.shape)


def _fake_activation(x: torch.Tensor, spec: QuantSpec, channel_dim: int) -> torch.Tensor:
    if not x.is_floating_point() or x.numel() == 0:
        return x
    bits, symmetric = spec.activation_bits, spec.activation_symmetric
    if spec.activation_granularity == "tensor":
        return fake_quantize(x.reshape(1, -1), bits, symmetric=symmetric).reshape(x.shape)
    moved = x.movedim(channel_dim, -1)
    out = fake_quantize(moved.reshape(-1, moved.shape[-1]), bits, symmetric=symmetric)
    return out.reshape(moved.shape).movedim(-1, channel_dim)


class _ActivationFakeQuant:
    """Wraps a layer's forward: fake-quantize its input, then run it."""

    def __init__(self, spec: QuantSpec, conv: bool):
        self.spec, self.conv = spec, conv

    def _channel_dim(self, x: torch.Tensor) -> int:
        if not self.conv:
            return -1
        return 1 if x.dim() == 4 else 0  # batched N×C×H×W or unbatched C×H×W

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            args = (_fake_activation(args[0], self.spec, self._channel_dim(args[0])), *args[1:])
        elif isinstance(kwargs.get("input"), torch.Tensor):
            kwargs["input"] = _fake_activation(kwargs["input"], self.spec, self._channel_dim(kwargs["input"]))
        return forward(*args, **kwargs)


# --- the config ----------------------------------------------------------------------------------


def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProfileError(f"{where}: expected true or false, got {value!r}")
    return value


def _as_choice(value: Any, where: str, choices: tuple[int, ...]) -> int:
    value = as_int(value, where)
    if value not in choices:
        raise ProfileError(f"{where}: {value} is not one of {', '.join(map(str, choices))}")
    return value


def _checked_spec_fields(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {
        "weight_bits": _as_choice(values["weight_bits"], f"{where}.weight_bits", WEIGHT_BITS),
        "activation_bits": _as_choice(values["activation_bits"], f"{where}.activation_bits", ACTIVATION_BITS),
        "granularity": as_str(values["granularity"], f"{where}.granularity", GRANULARITIES),
        "group_size": as_int(values["group_size"], f"{where}.group_size", minimum=1),
        "symmetric": _as_bool(values["symmetric"], f"{where}.symmetric"),
        "activation_granularity": as_str(
            values["activation_granularity"], f"{where}.activation_granularity", ACTIVATION_GRANULARITIES
        ),
        "activation_symmetric": _as_bool(values["activation_symmetric"], f"{where}.activation_symmetric"),
    }


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized; 16 bits leaves that side as it is.

    Fewer weight bits shrink the weights (8 → ¼ of float32, 4 → ⅛, plus scales) at the cost of
    rounding error; group-wise scales (``granularity="group"``, one scale per ``group_size`` inputs of
    an output channel) cut that error at the cost of more scales. ``symmetric=False`` adds a zero
    point per scale, which fits skewed weights better. Activations are quantized dynamically at the
    layer's input, over the whole tensor (the whole batch shares one range) or per token (one range
    per row of features; per pixel for a Conv2d); ``activation_symmetric=False`` suits one-sided
    inputs such as a GELU's output.
    """

    weight_bits: int = 16
    activation_bits: int = 16
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    activation_granularity: str = "tensor"
    activation_symmetric: bool = True

    def __post_init__(self) -> None:
        _checked_spec_fields({f.name: getattr(self, f.name) for f in fields(self)}, "QuantSpec")

    @property
    def is_identity(self) -> bool:
        """True when both sides keep 16 bits: the layer is left untouched."""
        return self.weight_bits == 16 and self.activation_bits == 16

    def to_dict(self, base: QuantSpec | None = None) -> dict[str, Any]:
        """All fields, or with ``base`` only those that differ from it (a ``layers`` entry)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out if base is None else {k: v for k, v in out.items() if getattr(base, k) != v}

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantization.default", base: QuantSpec | None = None) -> QuantSpec:
        """Missing fields come from ``base`` (the config's default for a ``layers`` entry)."""
        if not isinstance(data, Mapping):
            raise ProfileError(f"{where}: expected an object, got {data!r}")
        names = {f.name for f in fields(cls)}
        check_keys(data, names, where)
        start = base if base is not None else cls()
        values = {name: data.get(name, getattr(start, name)) for name in names}
        return cls(**_checked_spec_fields(values, where))


@register_technique("quantization", "bits")
@dataclass(frozen=True)
class QuantConfig:
    """Per-layer weight and activation bit-widths for the denoiser's Linear and Conv2d layers.

    ``default`` covers every layer; a ``layers`` entry (module path inside the denoiser → spec) covers
    the layers at or under that path, the longest matching path winning. In JSON a ``layers`` entry
    lists only what differs from ``default``; in Python it is a whole :class:`QuantSpec` (use
    ``dataclasses.replace(config.default, weight_bits=4)`` to inherit the rest). Fewer bits trade
    image quality for memory (and, with ``backend="torchao"`` where a kernel exists, speed).
    """

    backend: str = "simulated"
    default: QuantSpec = field(default_factory=QuantSpec)
    layers: dict[str, QuantSpec] = field(default_factory=dict)
    section: ClassVar[str]
    kind: ClassVar[str]

    def __post_init__(self) -> None:
        as_str(self.backend, "quantization.backend", BACKENDS)
        if not isinstance(self.default, QuantSpec):
            raise ProfileError(f"quantization.default: expected a QuantSpec, got {self.default!r}")
        if not isinstance(self.layers, Mapping):
            raise ProfileError(
                f"quantization.layers: expected a mapping of module path to QuantSpec, got {self.layers!r}"
            )
        for path, spec in self.layers.items():
            if not isinstance(path, str) or not path or path.startswith(".") or path.endswith("."):
                raise ProfileError(
                    f"quantization.layers: {path!r} is not a module path such as 'transformer_blocks.3.ff'"
                )
            if not isinstance(spec, QuantSpec):
                raise ProfileError(f"quantization.layers[{path!r}]: expected a QuantSpec, got {spec!r}")
        object.__setattr__(self, "layers", dict(self.layers))  # a private copy: the caller's dict may change

    def __hash__(self) -> int:
        return hash((self.backend, self.default, frozenset(self.layers.items())))

    def spec_for(self, path: str) -> QuantSpec:
        """The spec of the layer at ``path``: the longest ``layers`` key equal to it or above it, else ``default``."""
        best: str | None = None
        for key in self.layers:
            if (path == key or path.startswith(key + ".")) and (best is None or len(key) > len(best)):
                best = key
        return self.default if best is None else self.layers[best]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "bits",
            "backend": self.backend,
            "default": self.default.to_dict(),
            "layers": {path: spec.to_dict(base=self.default) for path, spec in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        check_keys(data, {"kind", "backend", "default", "layers"}, "quantization")
        backend = as_str(data.get("backend", "simulated"), "quantization.backend", BACKENDS)
        default = QuantSpec.from_dict(data.get("default", {}), "quantization.default")
        raw_layers = data.get("layers")
        raw_layers = {} if raw_layers is None else raw_layers
        if not isinstance(raw_layers, Mapping):
            raise ProfileError(f"quantization.layers: expected an object of module path → bits, got {raw_layers!r}")
        layers = {
            path: QuantSpec.from_dict(value, f"quantization.layers[{path!r}]", base=default)
            for path, value in raw_layers.items()
        }
        return cls(backend=backend, default=default, layers=layers)

    def apply(self, pipe: Any, *, strict: bool = True) -> QuantHandle:
        return apply_quantization(pipe, self, strict=strict)


# --- resolving layers ----------------------------------------------------------------------------

_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def _weight(layer: nn.Module) -> nn.Parameter:
    weight = layer.weight
    if not isinstance(weight, nn.Parameter):
        raise ProfileError(f"quantization: this {type(layer).__name__} has no weight parameter to quantize")
    return weight


def _denoiser(target: Any) -> nn.Module:
    if isinstance(target, nn.Module):
        return target
    from difftune.models import adapter_for

    # Not describe(): its fingerprint hashes every weight, and torchao's weights cannot be hashed as bytes.
    return adapter_for(target).denoiser(target)


def _layer_specs(denoiser: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Module, QuantSpec]]:
    """Every Linear / Conv2d of ``denoiser`` with its spec; a ``layers`` key matching none is an error."""
    layers = {name: m for name, m in denoiser.named_modules() if isinstance(m, _LAYER_TYPES)}
    containers = {name.rsplit(".", depth)[0] for name in layers for depth in range(name.count(".") + 1)}
    for key in config.layers:
        if key in containers:
            continue
        kind = type(denoiser.get_submodule(key)).__name__ if _has_submodule(denoiser, key) else None
        what = (
            f"is a {kind} with no Linear or Conv2d inside to quantize"
            if kind
            else f"is not a module of this {type(denoiser).__name__}"
        )
        close = difflib.get_close_matches(key, sorted(containers), n=5, cutoff=0.6)
        hint = (
            f"close matches: {', '.join(close)}"
            if close
            else f"valid paths include: {', '.join(sorted(containers, key=lambda p: (p.count('.'), p))[:8])}"
        )
        raise ProfileError(f"quantization.layers: {key!r} {what}; {hint}")
    return {name: (module, config.spec_for(name)) for name, module in layers.items()}


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


# --- torchao -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    # torchao's import logs a warning per CUDA extension it cannot load on a CPU machine; not our user's concern.
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@functools.cache
def _torchao() -> tuple[Any, str | None]:
    """(torchao.quantization, None) or (None, why it cannot be used)."""
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            import torchao.quantization as ao
    except Exception as exc:  # a broken build fails with OSError / RuntimeError as well as ImportError
        return None, f"torchao cannot be imported ({type(exc).__name__}: {exc}); install it with {_INSTALL_HINT}"
    return ao, None


def torchao_available() -> bool:
    """Whether ``backend="torchao"`` can run here (torchao imports with the installed torch)."""
    return _torchao()[0] is not None


class _Kernel(NamedTuple):
    label: str  # what the report says, e.g. "torchao:int8_weight_only"
    key: tuple[Any, ...]  # layers with equal keys share one quantize_ call
    make: Callable[[Any], Any]  # torchao.quantization -> its config object


def _torchao_kernel(module: nn.Module, spec: QuantSpec) -> _Kernel | str:
    """The torchao kernel that runs ``spec`` on ``module`` here, or why there is none."""
    if not isinstance(module, nn.Linear):
        return f"torchao quantizes nn.Linear layers only, this layer is a {type(module).__name__}"
    weight = _weight(module)
    device, dtype, in_features = weight.device, weight.dtype, module.in_features
    if spec.weight_bits == 16:
        return "torchao has no activation-only (W16A8) kernel"
    if spec.weight_bits == 8:
        if not spec.symmetric:
            return "torchao's int8 weights are symmetric (set symmetric: true)"
        if spec.activation_bits == 16:
            if spec.granularity == "channel":
                return _Kernel(
                    "torchao:int8_weight_only",
                    ("int8wo", None),
                    lambda ao: ao.Int8WeightOnlyConfig(granularity=ao.PerRow(), set_inductor_config=False),
                )
            if in_features % spec.group_size:
                return f"in_features {in_features} is not a multiple of group_size {spec.group_size}"
            size = spec.group_size
            return _Kernel(
                "torchao:int8_weight_only",
                ("int8wo", size),
                lambda ao: ao.Int8WeightOnlyConfig(granularity=ao.PerGroup(size), set_inductor_config=False),
            )
        if spec.granularity != "channel":
            return "torchao's int8 dynamic-activation kernel takes per-channel weights only (granularity: channel)"
        per_token, act_symmetric = spec.activation_granularity == "token", spec.activation_symmetric

        def make_dynamic(ao: Any) -> Any:
            act = ao.PerRow() if per_token else ao.PerTensor()
            mapping = ao.MappingType.SYMMETRIC if act_symmetric else ao.MappingType.ASYMMETRIC
            return ao.Int8DynamicActivationInt8WeightConfig(
                granularity=[act, ao.PerRow()], act_mapping_type=mapping, set_inductor_config=False
            )

        return _Kernel(
            "torchao:int8_dynamic_activation_int8_weight", ("int8dq", per_token, act_symmetric), make_dynamic
        )
    # 4-bit weights: torchao's tinygemm kernel, group-wise with zero points, CUDA and bfloat16 only.
    if spec.activation_bits != 16:
        return f"torchao has no int4-weight / int8-activation kernel on {device.type}"
    if device.type != "cuda":
        return f"torchao's int4 weight-only kernel needs a CUDA device, the weights are on {device.type}"
    if dtype != torch.bfloat16:
        return f"torchao's int4 weight-only kernel needs bfloat16 weights, these are {dtype}"
    if spec.granularity != "group" or spec.symmetric or spec.group_size not in (32, 64, 128, 256):
        return (
            "torchao's int4 kernel is group-wise with zero points: "
            "granularity group, symmetric false, group_size 32, 64, 128 or 256"
        )
    if in_features % spec.group_size:
        return f"in_features {in_features} is not a multiple of group_size {spec.group_size}"
    size = spec.group_size
    return _Kernel(
        "torchao:int4_weight_only",
        ("int4wo", size),
        lambda ao: ao.Int4WeightOnlyConfig(
            group_size=size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        ),
    )


def _restore_parameter(module: nn.Module, name: str, original: nn.Parameter, previous_repr: Any) -> None:
    setattr(module, name, original)
    # quantize_ also overrides extra_repr on the instance
    if previous_repr is None:
        module.__dict__.pop("extra_repr", None)
    else:
        module.__dict__["extra_repr"] = previous_repr


def _apply_torchao(
    ao: Any, denoiser: nn.Module, planned: dict[str, tuple[nn.Module, _Kernel]], handle: CompositeHandle
) -> dict[str, str]:
    """Run quantize_ once per distinct kernel config; returns the layers torchao left alone, with why."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for path, (_, kernel) in planned.items():
        groups.setdefault(kernel.key, []).append(path)
    originals: dict[str, nn.Parameter] = {}
    for path, (module, _) in planned.items():
        originals[path] = original = _weight(module)
        # The undo is registered before quantize_ runs, so a failure half way is undone too.
        undo = functools.partial(_restore_parameter, module, "weight", original, module.__dict__.get("extra_repr"))
        handle.add(Handle(undo))
    for paths in groups.values():
        names = frozenset(paths)
        config = planned[paths[0]][1].make(ao)
        ao.quantize_(denoiser, config, filter_fn=lambda _m, fqn, names=names: fqn in names)
    # torchao skips some shapes silently (logging at info level); those stay unquantized.
    return {
        path: "torchao left it unquantized (unsupported shape)"
        for path, (module, _) in planned.items()
        if module.weight is originals[path]
    }


# --- apply ---------------------------------------------------------------------------------------


class QuantHandle(CompositeHandle):
    """What :func:`apply_quantization` returns; ``remove()`` puts every weight and forward back.

    ``report`` maps each quantized layer's path to the path that ran it: ``"simulated"``,
    ``"torchao:int8_weight_only"``, ``"torchao:int8_dynamic_activation_int8_weight"`` or
    ``"torchao:int4_weight_only"``.
    """

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config
        self.report: dict[str, str] = {}

    def summary(self) -> dict[str, int]:
        """How many layers each path ran, e.g. ``{"simulated": 1, "torchao:int8_weight_only": 36}``."""
        counts: dict[str, int] = {}
        for label in self.report.values():
            counts[label] = counts.get(label, 0) + 1
        return counts


_REPORTS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, QuantConfig] = weakref.WeakKeyDictionary()


def _forget(denoiser: nn.Module) -> None:
    _REPORTS.pop(denoiser, None)
    _ACTIVE.pop(denoiser, None)


def active_quantization(target: Any) -> QuantConfig | None:
    """The :class:`QuantConfig` applied to ``target`` (a pipeline or its denoiser) and not yet removed, or None."""
    return _ACTIVE.get(_denoiser(target))


def quantization_report(target: Any) -> dict[str, str]:
    """Layer path → path that ran it (``"simulated"``, ``"torchao:…"``) for the quantization active on
    ``target`` (a pipeline or its denoiser); ``{}`` if none is."""
    return dict(_REPORTS.get(_denoiser(target), {}))


def _no_kernel(unsupported: dict[str, str], strict: bool, device: str) -> None:
    listed = "; ".join(f"{path!r}: {why}" for path, why in list(unsupported.items())[:6])
    more = f" (and {len(unsupported) - 6} more)" if len(unsupported) > 6 else ""
    if strict:
        raise ProfileError(
            f"quantization.backend 'torchao' has no real kernel on this {device} for {len(unsupported)} layer(s): "
            f"{listed}{more}. Use backend 'simulated' to measure quality only, keep these layers at 16 bits "
            "through 'layers', or apply with strict=False to simulate them"
        )
    # stacklevel: _no_kernel < _apply_torchao_where_possible < apply_quantization < QuantConfig.apply < caller
    warnings.warn(
        f"quantization: no torchao kernel here for {listed}{more}; simulating these layers instead", stacklevel=5
    )


def _apply_torchao_where_possible(
    denoiser: nn.Module, targets: Mapping[str, tuple[nn.Module, QuantSpec]], strict: bool, handle: QuantHandle
) -> None:
    """Put torchao's kernels on the layers that have one and record them in ``handle.report``."""
    ao, why_not = _torchao()
    if ao is None:
        if strict:
            raise ProfileError(
                f"quantization.backend 'torchao': {why_not}; or use backend 'simulated', "
                "or apply with strict=False to simulate every layer"
            )
        warnings.warn(f"quantization: {why_not}; simulating every layer instead", stacklevel=4)
        return
    planned: dict[str, tuple[nn.Module, _Kernel]] = {}
    unsupported: dict[str, str] = {}
    for path, (module, spec) in targets.items():
        kernel = _torchao_kernel(module, spec)
        if isinstance(kernel, str):
            unsupported[path] = kernel
        else:
            planned[path] = (module, kernel)
    device = _weight(next(iter(targets.values()))[0]).device.type
    if unsupported:
        _no_kernel(unsupported, strict, device)
    if planned:
        skipped = _apply_torchao(ao, denoiser, planned, handle)
        if skipped:
            _no_kernel(skipped, strict, device)
        handle.report.update({path: kernel.label for path, (_, kernel) in planned.items() if path not in skipped})


def apply_quantization(pipe: Any, config: QuantConfig, *, strict: bool = True) -> QuantHandle:
    """Quantize ``pipe``'s denoiser (or the module ``pipe`` itself) per ``config``; the handle undoes it exactly.

    The simulated backend swaps each quantized weight's data for its quantized-dequantized copy
    (computed once, here) and wraps the forward of layers whose activations are quantized; torchao
    replaces the weight parameters with its tensor subclasses. ``remove()`` puts back the very same
    parameter tensors and forwards. With ``strict`` a layer the torchao backend cannot run raises
    :class:`~difftune.ProfileError`; with ``strict=False`` it is simulated, with a warning.
    """
    denoiser = _denoiser(pipe)
    if denoiser in _REPORTS:
        raise ProfileError(
            f"this {type(denoiser).__name__} is already quantized: remove the previous quantization handle first"
        )
    targets = {path: (m, s) for path, (m, s) in _layer_specs(denoiser, config).items() if not s.is_identity}
    handle = QuantHandle(config)
    handle.add(Handle(functools.partial(_forget, denoiser)))
    try:
        if config.backend == "torchao" and targets:
            _apply_torchao_where_possible(denoiser, targets, strict, handle)
        simulated = {path: target for path, target in targets.items() if path not in handle.report}
        _apply_simulated(simulated, handle)
    except BaseException:
        handle.remove()
        raise
    _REPORTS[denoiser] = handle.report
    _ACTIVE[denoiser] = config
    return handle


def _restore_data(parameter: torch.Tensor, original: torch.Tensor) -> None:
    parameter.data = original


def _apply_simulated(targets: Mapping[str, tuple[nn.Module, QuantSpec]], handle: QuantHandle) -> None:
    done: set[int] = set()  # a weight shared by two layers is quantized once
    for path, (module, spec) in targets.items():
        weight = _weight(module)
        if spec.weight_bits < 16 and id(weight) not in done:
            done.add(id(weight))
            original = weight.data
            with torch.no_grad():
                fake = _fake_weight(original, spec)
            handle.add(Handle(functools.partial(_restore_data, weight, original)))
            weight.data = fake
        if spec.activation_bits < 16:
            handle.add(wrap_forward(module, _ActivationFakeQuant(spec, conv=isinstance(module, nn.Conv2d))))
        handle.report[path] = "simulated"


# --- memory --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of a module's parameters as they are (``original_bytes``) and stored per a config."""

    quantized_bytes: int
    original_bytes: int
    quantized_layers: int

    @property
    def ratio(self) -> float:
        """How many times smaller the quantized weights are."""
        return self.original_bytes / self.quantized_bytes if self.quantized_bytes else math.inf


def _quantized_weight_bytes(weight: torch.Tensor, spec: QuantSpec) -> int:
    rows = weight.shape[0]
    cols = weight.numel() // rows
    per_row = -(-cols // spec.group_size) if spec.granularity == "group" and spec.group_size < cols else 1
    scales = rows * per_row
    return -(-weight.numel() * spec.weight_bits // 8) + scales * (
        SCALE_BYTES + (0 if spec.symmetric else ZERO_POINT_BYTES)
    )


def weight_memory_bytes(module: Any, config: QuantConfig) -> WeightMemory:
    """Parameter memory of ``module`` (a denoiser, or a pipeline's denoiser) with its weights stored per ``config``.

    A quantized weight costs ``bits × numel / 8`` bytes plus one float32 scale per channel or group
    (:data:`SCALE_BYTES`) and, when asymmetric, one byte per zero point; every other parameter
    (biases, norms, embeddings, 16-bit layers) keeps its own dtype. Activation bits do not count.

        >>> weight_memory_bytes(nn.Linear(64, 32), QuantConfig(default=QuantSpec(weight_bits=8)))
        WeightMemory(quantized_bytes=2304, original_bytes=8320, quantized_layers=1)
    """
    denoiser = _denoiser(module)
    quantized: dict[int, QuantSpec] = {}
    for layer, spec in _layer_specs(denoiser, config).values():
        if spec.weight_bits < 16:
            quantized.setdefault(id(_weight(layer)), spec)
    original = total = 0
    for parameter in denoiser.parameters():
        size = parameter.numel() * parameter.element_size()
        original += size
        stored_as = quantized.get(id(parameter))
        total += size if stored_as is None else _quantized_weight_bytes(parameter, stored_as)
    return WeightMemory(quantized_bytes=total, original_bytes=original, quantized_layers=len(quantized))


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter occupies: a tensor subclass (torchao's quantized weights) by its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def served_weight_memory(target: Any) -> WeightMemory:
    """The denoiser's weights as they would be served with the quantization active on it now.

    Layers torchao runs count what torchao stores (int8 data, scales, zero points); layers the
    simulated backend runs count their bit-width plus scales (:func:`weight_memory_bytes`: what a
    real kernel would store); everything else its own bytes. With no quantization active, every
    parameter as it is (``quantized_bytes == original_bytes``).
    """
    denoiser = _denoiser(target)
    config = _ACTIVE.get(denoiser)
    report = _REPORTS.get(denoiser, {})
    simulated: dict[int, QuantSpec] = {}
    if config is not None:
        for path, (layer, spec) in _layer_specs(denoiser, config).items():
            if report.get(path) == "simulated" and spec.weight_bits < 16:
                simulated.setdefault(id(_weight(layer)), spec)
    total = original = 0
    for parameter in denoiser.parameters():
        stored_as = simulated.get(id(parameter))
        total += _stored_bytes(parameter) if stored_as is None else _quantized_weight_bytes(parameter, stored_as)
        original += parameter.numel() * parameter.element_size()
    torchao_layers = sum(1 for label in report.values() if label.startswith("torchao"))
    return WeightMemory(
        quantized_bytes=total, original_bytes=original, quantized_layers=len(simulated) + torchao_layers
    )
