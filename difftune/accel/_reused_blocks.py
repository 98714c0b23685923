"""What a transformer block computes when every one of its cached components is reused.

With every component of a block reused at a step, the block's output is its input plus the cached
component outputs, each scaled by that step's gate. The gates come from the timestep embedding, so
they change every step and must be recomputed; the norms, the modulation of the norms' outputs and
the components themselves are not needed. A :class:`FastPath` computes just that, with exactly the
operations (same operands, same order) the block's own forward would apply to the cached outputs, so
the result is bit-identical to running the block with every component hooked.

One fast path per diffusers block class, registered under the class's dotted name (a subclass, which
may compute something else, gets none and keeps the ordinary hook path). Each one mirrors the
``forward`` of diffusers 0.42; the tests compare both paths with ``torch.equal`` for every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from difftune.accel._hooks import Handle, wrap_forward

__all__ = ["FALLBACK", "FastPath", "Shared", "fast_path_for", "register_fast_path"]

#: Returned by :meth:`FastPath.run` when a call uses a feature the fast path does not mirror.
FALLBACK: Any = object()

_FAST_PATHS: dict[str, type[FastPath]] = {}


def register_fast_path(qualified_name: str) -> Callable[[type[FastPath]], type[FastPath]]:
    """Class decorator: the fast path of the block class ``module.QualName``."""

    def decorate(cls: type[FastPath]) -> type[FastPath]:
        _FAST_PATHS[qualified_name] = cls
        return cls

    return decorate


_QUALIFIED: dict[type, str] = {}


def _qualified(module: Any) -> str:
    """``module``'s class as ``module.QualName`` (memoised per class: the stack's checks run every run)."""
    cls = type(module)
    name = _QUALIFIED.get(cls)
    if name is None:
        name = _QUALIFIED[cls] = f"{cls.__module__}.{cls.__qualname__}"
    return name


_ADA_ZERO = "diffusers.models.normalization.AdaLayerNormZero"
_ADA_ZERO_X = "diffusers.models.normalization.SD35AdaLayerNormZeroX"


def _version(value: Any) -> int:
    return int(value._version) if isinstance(value, torch.Tensor) else 0


def _plain(module: Any, qualified_name: str) -> bool:
    """``module`` is exactly that class and its forward is not wrapped, so calling pieces of it by hand
    computes what calling it would."""
    return _qualified(module) == qualified_name and "forward" not in module.__dict__


class Shared:
    """What the fast paths of one applied schedule share across blocks within a denoiser call."""

    def __init__(self, tracker: Any = None) -> None:
        self._projection: tuple[Any, ...] | None = None
        # Whether a gate-only product gave the same bits as the whole one, per linear, input shape,
        # dtype and device (the BLAS picks its kernel by shape: the check is made once per shape).
        self._same_bits: dict[tuple[Any, ...], bool] = {}
        self.tracker = tracker  # the schedule's StepTracker: which step a call belongs to
        self.stack = _GateStack(self)

    def gates(self, linear: Any, x: torch.Tensor, chunks: int, picks: tuple[int, ...]) -> list[torch.Tensor]:
        """``[linear(x).chunk(chunks, dim=1)[i] for i in picks]``, computing only the picked chunks' rows of
        the weight where that gives the same bits.

        A reused block needs only its gates: of an adaLN modulation's 6 (or 9, or 3) chunks, the shift
        and scale chunks feed the norms it skips. Each output element of a matrix product is the same
        dot product whether the other columns are computed or not, but a BLAS may pick another kernel
        (another summation order) for another output width; so the first call per linear, input shape,
        dtype and device computes both and compares them bit for bit, and only a match is taken on
        (a mismatch keeps the whole product, which is what the block itself computes)."""
        weight: Any = getattr(linear, "weight", None)
        sliceable = (
            type(linear) is torch.nn.Linear
            and "forward" not in linear.__dict__
            and _hookless(linear)  # a torch hook on it fires only if the module is entered
            and type(weight.data) is torch.Tensor  # not a quantized tensor subclass
            and x.dim() == 2
            and weight.shape[0] % chunks == 0
        )

        def whole() -> list[torch.Tensor]:
            mod = linear(x).chunk(chunks, dim=1)
            return [mod[i] for i in picks]

        # Under torch.compile the check's outcome would be a guard, and its first call a graph more.
        if not sliceable or torch.compiler.is_compiling():
            return whole()
        rows = weight.shape[0] // chunks
        bias = linear.bias

        def picked() -> list[torch.Tensor]:
            return [
                torch.nn.functional.linear(
                    x, weight[i * rows : (i + 1) * rows], None if bias is None else bias[i * rows : (i + 1) * rows]
                )
                for i in picks
            ]

        key = (id(linear), tuple(x.shape), x.dtype, x.device, chunks, picks)
        same = self._same_bits.get(key)
        if same is None:
            reference = whole()
            self._same_bits[key] = all(torch.equal(a, b) for a, b in zip(reference, picked(), strict=True))
            return reference
        return picked() if same else whole()

    def timestep_projection(self, time_proj: Any, timestep: torch.Tensor) -> torch.Tensor:
        """``time_proj(timestep)``, computed once for all blocks of a call: the sinusoidal projection is
        parameter-free and deterministic, so every block would compute these same bits (DiT gives
        each block its own copy of it, the priciest part of a reused block's gates after the linears)."""
        key = _projection_key(time_proj)
        last = self._projection
        # The model hands every block the same timestep tensor; holding it keeps its identity unique.
        if last is not None and last[0] == key and last[1] is timestep and last[2] == timestep._version:
            return last[3]
        out = time_proj(timestep)
        self._projection = (key, timestep, timestep._version, out)
        return out


def fast_path_for(block: torch.nn.Module, cached: frozenset[str], shared: Shared) -> FastPath | None:
    """The fast path of ``block`` when its cached children (attribute names) are ``cached``, or ``None``.

    ``None`` when the block's class has no registered fast path, when its configuration is one the
    fast path does not mirror, or when some component its output depends on is not cached.
    """
    fast = _FAST_PATHS.get(_qualified(block))
    if fast is None or not fast.supports(block) or not fast.needs(block) <= cached:
        return None
    return fast(block, shared)


def _plus_gated(residual: torch.Tensor, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``residual + gate * value`` exactly as the blocks compute it (the product rounded, then the sum
    rounded), adding into the product's own fresh buffer where shape and dtype allow: a reused step is
    mostly such elementwise passes, and each saved allocation of an activation-sized tensor counts."""
    out = gate * value
    if out.shape == residual.shape and out.dtype == residual.dtype:
        return out.add_(residual)
    return residual + out


class _Arguments:
    """Reads a block forward's arguments by name, whether the model passed them by position
    (diffusers does under gradient checkpointing) or by keyword."""

    def __init__(self, forward: Callable[..., Any]):
        params = list(inspect.signature(forward).parameters.values())[1:]  # past ``self``
        self.index = {p.name: i for i, p in enumerate(params)}
        self.default = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def __call__(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.index[name]
        return args[i] if i < len(args) else self.default.get(name)


class FastPath:
    """The output of one block from its components' cached outputs; subclasses mirror one block class."""

    #: The block's ``forward`` parameter that carries the hidden states (the batch is read from it).
    hidden: ClassVar[str] = "hidden_states"

    def __init__(self, block: Any, shared: Shared):
        # ``Any``: the fast paths read diffusers' block attributes (norm1, attn2, …) by name.
        self.block: Any = block
        self.shared = shared
        self.arg = _Arguments(type(block).forward)

    @classmethod
    def supports(cls, block: Any) -> bool:
        """Whether this block's configuration is one the fast path mirrors. The adaLN modules whose
        pieces it calls by hand must be diffusers' own and unwrapped: a wrapper on them would be
        bypassed."""
        return True

    @classmethod
    def needs(cls, block: Any) -> frozenset[str]:
        """The children (attribute names) whose cached outputs the block's output is made of."""
        raise NotImplementedError

    def install(self, first: bool = True) -> list[Handle]:
        """Wrappers the fast path puts on the block's submodules besides the block (undone with it);
        ``first``: the block is the model's first."""
        return []

    def batch(self, args: tuple, kwargs: dict) -> int:
        return int(self.arg(args, kwargs, self.hidden).shape[0])

    def run(self, cached: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
        """The block's output for this call, or :data:`FALLBACK` (the caller then runs the block)."""
        raise NotImplementedError


@register_fast_path("diffusers.models.attention.BasicTransformerBlock")
class BasicBlockFastPath(FastPath):
    """DiT / the embedded model (``ada_norm_zero``) and PixArt (``ada_norm_single``):
    ``x + gate_msa·attn1 (+ attn2) + gate_mlp·ff``. With ``ada_norm_zero`` the gates need the block's
    own timestep-and-label embedding and modulation linear; with ``ada_norm_single`` they are the
    block's scale-shift table plus the model's shared timestep modulation."""

    @classmethod
    def supports(cls, block: Any) -> bool:
        if block.norm_type == "ada_norm_single":
            return True
        return block.norm_type == "ada_norm_zero" and _plain(block.norm1, _ADA_ZERO) and block.norm1.emb is not None

    @classmethod
    def needs(cls, block: Any) -> frozenset[str]:
        return frozenset({"attn1", "ff"} | ({"attn2"} if block.attn2 is not None else set()))

    def __init__(self, block: Any, shared: Shared):
        super().__init__(block, shared)
        emb = getattr(block.norm1, "emb", None)
        # The timestep-and-label embedding is unrolled (to share its projection) only where it is
        # diffusers' own, unwrapped; anything else is called as it is.
        self.unrolled = (
            emb is not None
            and _plain(emb, "diffusers.models.embeddings.CombinedTimestepLabelEmbeddings")
            and _plain(emb.time_proj, "diffusers.models.embeddings.Timesteps")
        )
        self._memo: tuple[Any, ...] | None = None
        self.emb_forward: Any = None  # the memo wrapper :meth:`install` puts on the embedding, once installed

    def conditioning(self, timestep: Any, class_labels: Any, dtype: Any, compute: Any = None) -> torch.Tensor:
        """``norm1.emb(timestep, class_labels, hidden_dtype=dtype)``, as CombinedTimestepLabelEmbeddings
        computes it, with the timestep projection shared by the blocks of the call.

        The last result is kept for the same tensors (same objects, unmodified since): DiT's output head
        calls the first block's embedding again with the block's own inputs, and gets it from here."""
        grad = torch.is_grad_enabled()
        # Under torch.compile the memo's identity checks would be guards that fail every step.
        compiling = torch.compiler.is_compiling()
        memo = None if compiling else self._memo
        if (
            memo is not None
            and memo[0] is timestep
            and memo[2] is class_labels
            and memo[1] == _version(timestep)
            and memo[3] == _version(class_labels)
            and memo[4] == dtype
            and memo[5] == grad
        ):
            return memo[6]
        emb = self.block.norm1.emb
        if compute is not None:
            out = compute()
        elif self.unrolled and isinstance(timestep, torch.Tensor):
            projection = self.shared.timestep_projection(emb.time_proj, timestep)
            out = emb.timestep_embedder(projection.to(dtype=dtype)) + emb.class_embedder(class_labels)
        else:
            out = emb(timestep, class_labels, hidden_dtype=dtype)
        if not compiling:
            self._memo = (timestep, _version(timestep), class_labels, _version(class_labels), dtype, grad, out)
        return out

    def own_gates(self, timestep: Any, class_labels: Any, dtype: Any) -> list[torch.Tensor]:
        """``(gate_msa, gate_mlp)`` of this block alone: its conditioning, SiLU and modulation linear."""
        norm1 = self.block.norm1
        emb = self.conditioning(timestep, class_labels, dtype)
        return self.shared.gates(norm1.linear, norm1.silu(emb), 6, (2, 5))

    def remember(self, timestep: Any, class_labels: Any, dtype: Any, out: torch.Tensor) -> None:
        """Keep ``out`` as this block's conditioning for these inputs (the output head asks block 0's again)."""
        grad = torch.is_grad_enabled()
        self._memo = (timestep, _version(timestep), class_labels, _version(class_labels), dtype, grad, out)

    def install(self, first: bool = True) -> list[Handle]:
        # Only the first block's embedding is called again (by DiT's output head): elsewhere the wrapper would
        # be a layer of Python around every computed step's embedding, for a memo nobody reads.
        if not self.unrolled or not first:
            return []

        def remembered(inner: Callable[..., Any], timestep: Any, class_labels: Any, hidden_dtype: Any = None) -> Any:
            return self.conditioning(
                timestep, class_labels, hidden_dtype, lambda: inner(timestep, class_labels, hidden_dtype=hidden_dtype)
            )

        handle = wrap_forward(self.block.norm1.emb, remembered)
        self.emb_forward = self.block.norm1.emb.__dict__.get("forward")
        return [handle]

    def run(self, cached: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
        block, arg = self.block, self.arg
        cross_kwargs = arg(args, kwargs, "cross_attention_kwargs")
        # Chunked feed-forward and GLIGEN's fuser (between the two attentions) are not mirrored.
        if block._chunk_size is not None or (cross_kwargs and cross_kwargs.get("gligen") is not None):
            return FALLBACK
        hidden = arg(args, kwargs, "hidden_states")
        timestep = arg(args, kwargs, "timestep")
        if block.norm_type == "ada_norm_zero":
            class_labels = arg(args, kwargs, "class_labels")
            stacked = self.shared.stack.gates(self, timestep, class_labels, hidden.dtype)
            if stacked is None:
                gate_msa, gate_mlp = (g.unsqueeze(1) for g in self.own_gates(timestep, class_labels, hidden.dtype))
            else:
                gate_msa, gate_mlp = stacked
        else:
            # Only the two gate rows of ``(table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)``:
            # an elementwise sum, so its picked rows are the same bits as the whole one's.
            table, modulation = block.scale_shift_table[None], timestep.reshape(hidden.shape[0], 6, -1)
            gate_msa, gate_mlp = (table[:, i : i + 1] + modulation[:, i : i + 1] for i in (2, 5))
        hidden = _plus_gated(hidden, gate_msa, cached["attn1"])
        if hidden.ndim == 4:
            hidden = hidden.squeeze(1)
        if block.attn2 is not None:
            # The cross-attention output is added ungated in every norm type.
            hidden = cached["attn2"] + hidden
        hidden = _plus_gated(hidden, gate_mlp, cached["ff"])
        if hidden.ndim == 4:
            hidden = hidden.squeeze(1)
        return hidden


@register_fast_path("diffusers.models.transformers.transformer_flux.FluxTransformerBlock")
class FluxDoubleFastPath(FastPath):
    """Flux double-stream block: image ``x + gate_msa·attn + gate_mlp·ff``, text
    ``c + c_gate_msa·attn_context + c_gate_mlp·ff_context``; gates from ``temb`` through the two
    adaLN modulation linears."""

    @classmethod
    def supports(cls, block: Any) -> bool:
        return all(_plain(norm, _ADA_ZERO) and norm.emb is None for norm in (block.norm1, block.norm1_context))

    @classmethod
    def needs(cls, block: Any) -> frozenset[str]:
        return frozenset({"attn", "ff", "ff_context"})

    def run(self, cached: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
        block, arg = self.block, self.arg
        hidden = arg(args, kwargs, "hidden_states")
        context = arg(args, kwargs, "encoder_hidden_states")
        temb = arg(args, kwargs, "temb")
        gate_msa, gate_mlp = self.shared.gates(block.norm1.linear, block.norm1.silu(temb), 6, (2, 5))
        c_gate_msa, c_gate_mlp = self.shared.gates(
            block.norm1_context.linear, block.norm1_context.silu(temb), 6, (2, 5)
        )
        attention = cached["attn"]
        hidden = _plus_gated(hidden, gate_msa.unsqueeze(1), attention[0])
        hidden = _plus_gated(hidden, gate_mlp.unsqueeze(1), cached["ff"])
        if len(attention) == 3:  # IP-Adapter's image attention, added ungated
            hidden = hidden + attention[2]
        context = _plus_gated(context, c_gate_msa.unsqueeze(1), attention[1])
        context = _plus_gated(context, c_gate_mlp.unsqueeze(1), cached["ff_context"])
        if context.dtype == torch.float16:
            context = context.clip(-65504, 65504)
        return context, hidden


@register_fast_path("diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock")
class FluxSingleFastPath(FastPath):
    """Flux single-stream block: ``[c; x] + gate·proj_out`` (the cached ``proj_out`` output already
    holds the attention and MLP branches, so those two are not needed at all)."""

    @classmethod
    def supports(cls, block: Any) -> bool:
        return _plain(block.norm, "diffusers.models.normalization.AdaLayerNormZeroSingle")

    @classmethod
    def needs(cls, block: Any) -> frozenset[str]:
        return frozenset({"proj_out"})

    def run(self, cached: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
        block, arg = self.block, self.arg
        context = arg(args, kwargs, "encoder_hidden_states")
        text_len = context.shape[1]
        hidden = torch.cat([context, arg(args, kwargs, "hidden_states")], dim=1)
        (gate,) = self.shared.gates(block.norm.linear, block.norm.silu(arg(args, kwargs, "temb")), 3, (2,))
        hidden = _plus_gated(hidden, gate.unsqueeze(1), cached["proj_out"])
        if hidden.dtype == torch.float16:
            hidden = hidden.clip(-65504, 65504)
        return hidden[:, :text_len], hidden[:, text_len:]


@register_fast_path("diffusers.models.attention.JointTransformerBlock")
class JointBlockFastPath(FastPath):
    """SD3 / SD3.5 joint block: image ``x + gate_msa·attn (+ gate_msa2·attn2) + gate_mlp·ff``, text
    ``c + c_gate_msa·attn_context + c_gate_mlp·ff_context`` (``None`` in the last, context-pre-only
    block)."""

    @classmethod
    def supports(cls, block: Any) -> bool:
        norm1 = _ADA_ZERO_X if block.use_dual_attention else _ADA_ZERO
        if not (_plain(block.norm1, norm1) and getattr(block.norm1, "emb", None) is None):
            return False
        return bool(block.context_pre_only) or (
            _plain(block.norm1_context, _ADA_ZERO) and block.norm1_context.emb is None
        )

    @classmethod
    def needs(cls, block: Any) -> frozenset[str]:
        names = {"attn", "ff"}
        if block.use_dual_attention:
            names.add("attn2")
        if not block.context_pre_only:
            names.add("ff_context")
        return frozenset(names)

    def run(self, cached: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
        block, arg = self.block, self.arg
        if block._chunk_size is not None:
            return FALLBACK
        hidden = arg(args, kwargs, "hidden_states")
        temb = arg(args, kwargs, "temb")
        dual = block.use_dual_attention
        gates = self.shared.gates(
            block.norm1.linear, block.norm1.silu(temb), 9 if dual else 6, (2, 5, 8) if dual else (2, 5)
        )
        attention, context_attention = cached["attn"]
        hidden = _plus_gated(hidden, gates[0].unsqueeze(1), attention)
        if dual:
            hidden = _plus_gated(hidden, gates[2].unsqueeze(1), cached["attn2"])
        hidden = _plus_gated(hidden, gates[1].unsqueeze(1), cached["ff"])
        if block.context_pre_only:
            return None, hidden
        context = arg(args, kwargs, "encoder_hidden_states")
        c_gate_msa, c_gate_mlp = self.shared.gates(
            block.norm1_context.linear, block.norm1_context.silu(temb), 6, (2, 5)
        )
        context = _plus_gated(context, c_gate_msa.unsqueeze(1), context_attention)
        context = _plus_gated(context, c_gate_mlp.unsqueeze(1), cached["ff_context"])
        return context, hidden


#: Stacked weight copies above this many bytes are not made (they are the price of the stacked products).
_STACK_BYTES = 64 * 2**20
#: The most the gates kept per (timestep, labels) may take before they are all dropped.
_KEPT_BYTES = 64 * 2**20


class _GateStack:
    """The gates of every DiT-style block reused at a step, computed for all of them at once.

    A fully reused ``ada_norm_zero`` block still computes its own gates from the step's timestep and
    labels — a timestep MLP, a label lookup, a SiLU and the modulation product, about a dozen small
    operations per block and step; on a small model on a CPU that is more time than the rest of a
    reused step. The gates depend on the timestep and labels only, so the first reused block of a step
    computes them for every block reused at that step with the blocks' weights stacked: one ``baddbmm``
    over the blocks per linear and one gather from the stacked label tables. A BLAS may sum a batched
    product in another order than single ones, so the first step per set of blocks, input shapes and
    dtype computes both ways, and the stacked way is kept only where every block's gates and
    conditioning are the same bits (tested, including a BLAS that rounds differently). CPU only — on a
    GPU the small products are kernel launches, and ``_version`` checks would not catch a device copy —
    inference only (no gradient reaches the stacked copies), and only while the copies stay under
    64 MiB.
    """

    def __init__(self, shared: Shared):
        self.shared = shared
        self.members: list[tuple[Any, Any]] = []  # (fast path, steps where its block is fully reused)
        self._groups: dict[int, tuple[list[Any], tuple[int, ...]]] = {}  # per step: its members and their ids
        # per group: (source storages and versions, the stacked views the products use, the stacked copies)
        self._weights: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._same: dict[tuple[Any, ...], str | bool] = {}
        self._memo: tuple[Any, ...] | None = None
        self._labels: tuple[Any, ...] | None = None  # the last labels' distinct values (one call's, every step)
        # Groups whose stacked copies were checked against their source weights in this sampling run: the
        # check (every source tensor's storage and version) runs once per run, not per step.
        self._checked: set[tuple[int, ...]] = set()
        # Each group's timestep-MLP output per timestep value, keyed by the group's stacked weights (a
        # restack after a weight change starts afresh).
        self._times: dict[tuple[Any, ...], torch.Tensor] = {}
        # Each group's conditioning and gates per (timestep value, labels): a serving batch of the same
        # labels, and every bench and calibration run, meets the same pairs at every call.
        self._kept: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._kept_bytes = 0
        self._label_values: tuple[Any, ...] | None = None  # the last labels tensor and its values
        if shared.tracker is not None:
            shared.tracker.add_listener(self)

    def reset(self) -> None:
        """A new sampling run: check the stacked copies against their weights again at their next use."""
        self._checked.clear()

    def enlist(self, fast: FastPath, reused: Any) -> None:
        """Let ``fast`` take part where it is a DiT-style block with diffusers' own embedding modules."""
        if isinstance(fast, BasicBlockFastPath) and fast.block.norm_type == "ada_norm_zero" and _stackable(fast):
            self.members.append((fast, reused))
            self._groups.clear()

    def gates(self, fast: Any, timestep: Any, class_labels: Any, dtype: Any) -> Any:
        """``fast``'s ``(gate_msa, gate_mlp)`` from the stacked computation of this step, shaped as the block
        uses them (``[batch, 1, D]``), or ``None`` (the block then computes its own)."""
        tracker = self.shared.tracker
        if tracker is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        step, call = tracker.step, tracker.call
        memo = self._memo
        # the step's first block made the checks below on these very tensors
        if (
            memo is not None
            and memo[2] is timestep
            and memo[4] is class_labels
            and memo[0] == step
            and memo[1] == call
            and memo[3] == timestep._version
            and memo[5] == class_labels._version
            and memo[6] == dtype
        ):
            return memo[7].get(id(fast))
        if (
            len(self.members) < 2
            or not isinstance(timestep, torch.Tensor)
            or not isinstance(class_labels, torch.Tensor)
            or not timestep.is_cpu
            or timestep.dim() != 1
            or class_labels.dim() != 1
        ):
            return None
        result: dict[int, Any] = {}
        self._memo = (step, call, timestep, timestep._version, class_labels, class_labels._version, dtype, result)
        found = self._groups.get(step)
        if found is None:
            members = [m for m, reused in self.members if 0 <= step < len(reused) and reused[step]]
            found = self._groups[step] = (members, tuple(id(m) for m in members))
        group, ids = found
        if len(group) < 2 or id(fast) not in ids:
            return None
        key = (ids, tuple(timestep.shape), tuple(class_labels.shape), dtype)
        way = self._same.get(key)  # None: not checked yet; "distinct" or "batch": the way that agreed
        weights = None if way is False else self._stacked(group, dtype, ids)
        if weights is None:
            return None
        if way is None:
            own = [member.own_gates(timestep, class_labels, dtype) for member in group]
            conditioning = [member.conditioning(timestep, class_labels, dtype) for member in group]
            way = False
            for candidate in ("distinct", "batch"):
                emb, gates = self._compute(group, weights, timestep, class_labels, dtype, candidate == "distinct")
                if all(
                    torch.equal(conditioning[i], emb[i])
                    and all(torch.equal(a.unsqueeze(1), b) for a, b in zip(own[i], gates[i], strict=True))
                    for i in range(len(group))
                ):
                    way = candidate
                    break
            self._same[key] = way
            for i, member in enumerate(group):
                result[id(member)] = tuple(g.unsqueeze(1) for g in own[i])
        else:
            emb, gates = self._compute(group, weights, timestep, class_labels, dtype, way == "distinct")
            for i, member in enumerate(group):
                if member.emb_forward is not None:  # the one embedding called again (by DiT's head)
                    member.remember(timestep, class_labels, dtype, emb[i])
                result[id(member)] = gates[i]
        return result.get(id(fast))

    def _stacked(self, group: list[Any], dtype: Any, ids: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
        """The group's weights stacked over blocks (kept while every source tensor is unmodified), or
        ``None`` when they differ in shape, dtype or device, or would take more than 64 MiB. ``ids``: the
        group's fast paths' ids."""
        if ids in self._checked:
            return self._weights.get(ids, (None, None))[1]
        self._checked.add(ids)
        found = [_sources(m) for m in group]
        sources = [row for row in found if row is not None]
        if len(sources) < len(found):  # hooked or replaced since the schedule was applied
            if self._weights.pop(ids, None) is not None:
                self._forget()  # keyed by the dropped copies' id, which a later copy may get
            return None
        stamp = tuple((t.data_ptr(), t._version) for row in sources for t in row)
        kept = self._weights.get(ids)
        width = sources[0][2].shape[0]  # the conditioning width D; the modulation linear has 6·D rows
        # Reused while the copies hold the weights' values: compared in full once per run (see _Values), as
        # an edit through ``.data`` changes neither storage nor version.
        if kept is not None and kept[0] == stamp and (kept[1] is None or kept[2].holds_values()):
            return kept[1]
        first = sources[0]
        uniform = (
            all(
                a.shape == b.shape and a.dtype == b.dtype == dtype and a.device == b.device and a.is_contiguous()
                for row in sources
                for a, b in zip(row, first, strict=True)
            )
            and len({_projection_key(m.block.norm1.emb.time_proj) for m in group}) == 1
        )
        size = sum(t.numel() * t.element_size() for t in first[:5]) + first[5].numel() * first[5].element_size() // 3
        stacked: tuple[torch.Tensor, ...] | None = None
        values: _Values | None = None
        if uniform and first[5].shape[0] == 6 * width and size * len(group) <= _STACK_BYTES:
            with torch.no_grad():
                raw = (
                    *(torch.stack([row[k] for row in sources]) for k in range(5)),
                    torch.stack([torch.cat([w[2 * width : 3 * width], w[5 * width :]]) for *_, w, _ in sources]),
                    torch.stack([torch.cat([b[2 * width : 3 * width], b[5 * width :]]) for *_, b in sources]),
                )
            stacked = (
                raw[0].transpose(1, 2),
                raw[1][:, None, :],
                raw[2].transpose(1, 2),
                raw[3][:, None, :],
                raw[4],
                raw[5].transpose(1, 2),
                raw[6][:, None, :],
            )
            values = _Values(sources, width)
        if kept is not None:  # restacked: what was computed from the old copies goes (keyed by their id)
            self._forget()
        self._weights[ids] = (stamp, stacked, values)
        return stacked

    def _compute(
        self,
        group: list[Any],
        weights: tuple[torch.Tensor, ...],
        timestep: torch.Tensor,
        labels: torch.Tensor,
        dtype: Any,
        distinct: bool,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every group block's conditioning ``[blocks, batch, D]`` and gates, as
        ``CombinedTimestepLabelEmbeddings`` + SiLU + the modulation linear compute them, block by block.

        With ``distinct``, where the batch shares one timestep and repeats labels (classifier-free
        guidance's unconditional half is one null label), the timestep MLP runs on 4 rows and the gates
        on the distinct labels, then spread over the batch: the rows' values are the batch computation's
        where the smaller products sum in the same order (MKL's kernels for 1-3, 5-7 and 9-11 rows do not,
        hence multiples of 4; for a batch of such a size neither do the batch's own). :meth:`gates` checks
        both ways. The timestep MLP's output is a constant of the timestep's value (and of weights checked
        every run); a schedule's timesteps recur every call, so it is kept per value where the batch has
        one timestep, and the whole result per timestep value and labels."""
        # ``t.expand(batch)``, as pipelines pass it, holds one value by its stride alone
        one = bool(len(timestep)) and (
            timestep.stride(0) == 0 or torch.equal(timestep, timestep[:1].expand_as(timestep))
        )
        key = self._kept_key(weights, timestep, labels, dtype, distinct) if one else None
        kept = None if key is None else self._kept.get(key)
        # the kept tensors are handed out as they are: one modified in place since is computed again
        if kept is not None and kept[0]._version == kept[1] and kept[2]._version == kept[3]:
            return kept[4]
        tables, wg, bg = weights[4:]
        width = tables.shape[-1]
        rows = self._distinct(timestep, labels) if distinct else None
        if rows is None:
            step_mlp = self._timestep_mlp(group, weights, timestep, dtype, len(timestep) if one else None)
            emb = step_mlp + tables.index_select(1, labels)
            gates = torch.baddbmm(bg, torch.nn.functional.silu(emb), wg)
        else:
            times, distinct_labels, index = rows
            step_mlp = self._timestep_mlp(group, weights, times, dtype, 4)[:, :1]
            emb_rows = step_mlp + tables.index_select(1, distinct_labels)
            gates = torch.baddbmm(bg, torch.nn.functional.silu(emb_rows), wg).index_select(1, index)
            emb = emb_rows.index_select(1, index)
        result = emb, [(g[:, None, :width], g[:, None, width:]) for g in gates]  # as the blocks unsqueeze them
        if key is not None:
            size = (emb.numel() + gates.numel()) * emb.element_size()
            if self._kept_bytes + size > _KEPT_BYTES:
                self._kept.clear()
                self._kept_bytes = 0
            self._kept[key] = (emb, emb._version, gates, gates._version, result)
            self._kept_bytes += size
        return result

    def _kept_key(
        self,
        weights: tuple[torch.Tensor, ...],
        timestep: torch.Tensor,
        labels: torch.Tensor,
        dtype: Any,
        distinct: bool,
    ) -> tuple[Any, ...]:
        """What the group's conditioning and gates are a function of, for a batch with one timestep: the
        stacked copies (checked against the weights every run), the timestep's value and the labels'."""
        last = self._label_values
        if last is None or last[0] is not labels or last[1] != labels._version:
            last = self._label_values = (labels, labels._version, tuple(labels.tolist()))
        # the timestep's length too: MKL may sum a 1-row product in another order than a 32-row one
        return (
            id(weights),
            float(timestep[0]),
            tuple(timestep.shape),
            timestep.dtype,
            last[2],
            labels.dtype,
            dtype,
            distinct,
        )

    def _forget(self) -> None:
        """Drop everything computed from stacked copies: it is keyed by their id, which later copies may get."""
        self._times.clear()
        self._kept.clear()
        self._kept_bytes = 0

    def _timestep_mlp(
        self, group: list[Any], weights: tuple[torch.Tensor, ...], times: torch.Tensor, dtype: Any, rows: int | None
    ) -> torch.Tensor:
        """Every group block's timestep MLP on ``times`` (``[blocks, len(times), D]``), kept per timestep value
        where ``rows`` says all ``times`` are one value."""
        w1, b1, w2, b2 = weights[:4]
        key = None if rows is None else (id(weights), float(times[0]), rows, times.dtype, dtype)
        kept = None if key is None else self._times.get(key)
        if kept is not None:
            return kept
        time_proj = group[0].block.norm1.emb.time_proj
        projection = self.shared.timestep_projection(time_proj, times).to(dtype=dtype)
        hidden = torch.baddbmm(b1, projection.expand(len(group), *projection.shape), w1)
        out = torch.baddbmm(b2, torch.nn.functional.silu(hidden), w2)
        if key is not None:
            if len(self._times) >= 4096:
                self._times.clear()
            self._times[key] = out
        return out

    def _distinct(self, timestep: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """``(4 timesteps, distinct labels, index)`` with ``distinct[index]`` equal to ``labels``, when the
        batch has one timestep and fewer distinct labels than rows (padded to a multiple of 4); else ``None``."""
        if timestep.dim() != 1 or labels.dim() != 1 or len(timestep) != len(labels) or len(labels) <= 4:
            return None
        if not torch.equal(timestep, timestep[:1].expand_as(timestep)):
            return None
        kept = self._labels
        if kept is None or kept[0] is not labels or kept[1] != labels._version:
            distinct, index = torch.unique(labels, return_inverse=True)
            padded = -(-len(distinct) // 4) * 4
            distinct = torch.cat([distinct, distinct[-1:].expand(padded - len(distinct))])
            kept = self._labels = (labels, labels._version, None if padded >= len(labels) else (distinct, index))
        if kept[2] is None:
            return None
        return (timestep[:1].expand(4), *kept[2])


#: Integer types by element size, to compare floating-point values bit for bit.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Values:
    """The values the stacked copies are made of, kept to tell whether the weights still hold them: an edit
    through ``.data`` (as peft's merge does) changes neither a weight's storage nor its version."""

    def __init__(self, sources: Sequence[tuple[Any, ...]], width: int):
        parts: list[torch.Tensor] = []
        for w1, b1, w2, b2, table, weight, bias in sources:
            parts += (w1, b1, w2, b2, table, weight[2 * width : 3 * width], weight[5 * width :])
            parts += (bias[2 * width : 3 * width], bias[5 * width :])
        # Flat views of the weights themselves (valid while their storage is: the caller checks it first), as
        # integers of the same width: compared bit for bit (a NaN weight equals itself, -0.0 differs from 0.0),
        # and integer comparison is the cheaper one.
        bits = _BITS.get(parts[0].element_size()) if parts[0].is_floating_point() else None
        self.parts = [part.detach().reshape(-1) for part in parts]
        if bits is not None:
            self.parts = [part.view(bits) for part in self.parts]
        with torch.no_grad():
            self.copy = torch.cat(self.parts)
        self.scratch = torch.empty_like(self.copy)

    def holds_values(self) -> bool:
        """The weights hold the values the copies were made of, bit for bit: gathered into one buffer and
        compared in one operation (~0.2-0.3 ms on the embedded model, once per run)."""
        torch.cat(self.parts, out=self.scratch)  # detached views: no autograd to keep out
        return torch.equal(self.scratch, self.copy)


def _projection_key(time_proj: Any) -> tuple[Any, ...]:
    return (time_proj.num_channels, time_proj.flip_sin_to_cos, time_proj.downscale_freq_shift, time_proj.scale)


def _hookless(*modules: Any) -> bool:
    """No torch hooks on these modules: the stack computes their outputs without entering them."""
    return not any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None) for m in modules
    )


_EMBEDDINGS = "diffusers.models.embeddings."


def _sources(fast: Any) -> tuple[torch.Tensor, ...] | None:
    """The block's conditioning weights ``(linear_1 weight, bias, linear_2 weight, bias, label table, modulation
    weight, bias)``, where its conditioning is diffusers' own modules, unwrapped (but for the fast path's own
    memo on the embedding) and unhooked, with nothing the stack does not mirror (a conditioning projection, a
    post-activation, label dropout in training); else ``None``. Checked when the schedule is applied and at
    the start of every sampling run, so it reads the modules' dictionaries directly (``nn.Module`` attribute
    lookups cost a few µs a block)."""
    norm1 = fast.block._modules.get("norm1")
    emb = None if norm1 is None else norm1._modules.get("emb")
    if emb is None or _qualified(emb) != _EMBEDDINGS + "CombinedTimestepLabelEmbeddings":
        return None
    if emb.__dict__.get("forward") not in (None, fast.emb_forward):
        return None
    inner = emb._modules
    time_proj, mlp, labels = inner.get("time_proj"), inner.get("timestep_embedder"), inner.get("class_embedder")
    if (
        time_proj is None
        or mlp is None
        or labels is None
        or _qualified(time_proj) != _EMBEDDINGS + "Timesteps"
        or _qualified(mlp) != _EMBEDDINGS + "TimestepEmbedding"
        or _qualified(labels) != _EMBEDDINGS + "LabelEmbedding"
    ):
        return None
    linear_1, act, linear_2 = mlp._modules.get("linear_1"), mlp._modules.get("act"), mlp._modules.get("linear_2")
    table = labels._modules.get("embedding_table")
    linear, silu = norm1._modules.get("linear"), norm1._modules.get("silu")
    if (
        type(act) is not torch.nn.SiLU
        or type(silu) is not torch.nn.SiLU
        or type(table) is not torch.nn.Embedding
        or any(type(m) is not torch.nn.Linear for m in (linear_1, linear_2, linear))
        or getattr(mlp, "cond_proj", None) is not None
        or getattr(mlp, "post_act", None) is not None
        or (labels.training and labels.dropout_prob > 0)
    ):
        return None
    modules = (norm1, emb, time_proj, mlp, linear_1, act, linear_2, labels, table, linear, silu)
    if not _hookless(*modules) or any(m is not emb and "forward" in m.__dict__ for m in modules):
        return None
    out: list[Any] = []
    for module, names in ((linear_1, ("weight", "bias")), (linear_2, ("weight", "bias")), (table, ("weight",))):
        out += (module._parameters.get(name) for name in names)
    out += (linear._parameters.get("weight"), linear._parameters.get("bias"))
    # plain tensors only: not a quantized tensor subclass (a parameter wrapping one has the subclass's type)
    if any(type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor for t in out):
        return None
    return tuple(out)


def _stackable(fast: Any) -> bool:
    return _sources(fast) is not None
