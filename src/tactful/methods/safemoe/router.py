"""SafeMoE routing: frozen LoRA experts mixed per token by a small learned safety router.

Every adapted `nn.Linear` inside a decoder layer becomes a `RoutedLinear`:

    out = W0 x + sum_i g_i(h) * B_i A_i x * scaling_i
    g(h) = softmax(W_l · rms_norm(h) / tau)        (over the experts)

where h is the hidden state *entering that decoder layer*. A forward pre-hook on each
decoder layer computes g once for all of the layer's routed linears, so SafeMoE needs
**one** forward pass per step (PEFT's X-LoRA runs a second "scaling pass" to get its
gates and cannot use a KV cache). With a KV cache the gate of a new token comes from that
token's own hidden state, so `model.generate` and tactful's HFGenerator work unchanged.

The experts' low-rank products are batched: each RoutedLinear stacks its experts' A
matrices into one [in, E*r] tensor and the B matrices (scaling folded in) into one
[E*r, out] tensor, so the experts cost two matmuls and one multiply whatever E is, not a
Python loop over experts.

Options (`RouterSettings`): per-layer gates or one gate shared by all layers; soft
routing or top-k (exactly k experts, renormalised); per-token routing or the static
per-sequence ablation (one gate per sequence from the mean prompt hidden state);
temperature; optional entropy and load-balance regularisers. Routing weights per token
can be recorded for inspection (off by default: it costs a device-to-host copy per layer).

Two gate forms beyond the paper's softmax, because a softmax over unsafe experts always
adds a full unit of unsafe update (the weights sum to 1, so the router can move weight
between experts but never turn them down):
- `null_expert`: one more softmax slot, "none", that contributes nothing, so the weights
  of the real experts sum to 1 - g_none and the router can fall back to the base model;
- `gate: tanh`: independent signed weights in (-1, 1) per expert, so the router can also
  subtract an expert (task-arithmetic negation of the unsafe update).

Known X-LoRA problems this design avoids: experts that adapt different modules (missing
ones are zero blocks), `disable_adapter` not disabling experts (`SafeMoE.disabled()`
really returns the base model), `generate()` changing which parameters train (experts
are buffers, never parameters; generation touches no `requires_grad`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tactful import architectures
from tactful.errors import UserError
from tactful.kv_cache import cache_in

GRANULARITIES = ("token", "sequence")
GATES = ("softmax", "tanh")
NULL_SLOT = "none"  # the name of the null expert's column in routing records
ROUTER_ATTR = "safemoe_router"  # the router's name as a submodule of the model (its state-dict prefix)
_STATIC_ATTR = "_safemoe_static"  # per-sequence routing state kept on a KV cache object
_EPS = 1e-6


@dataclass
class RouterSettings:
    granularity: str = field(default="token", metadata={
        "choices": GRANULARITIES,
        "help": "token: a gate per token (SafeMoE); sequence: one gate per sequence from the mean prompt "
                "hidden state (the static-routing ablation)."})
    top_k: int | None = field(default=None, metadata={
        "help": "None: soft routing over all experts; k: keep exactly the k highest-scoring experts, renormalised "
                "(the null expert counts as one); with gate=tanh the k largest |weights|, not renormalised."})
    gate: str = field(default="softmax", metadata={
        "choices": GATES,
        "help": "softmax: weights over the experts sum to 1 (the paper); tanh: an independent signed weight in "
                "(-1, 1) per expert, so the router can turn an expert off or subtract it."})
    null_expert: bool = field(default=False, metadata={
        "help": "softmax only: add a 'none' slot that contributes nothing, so the real experts' total weight can "
                "fall below 1 (down to the base model alone)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature tau; lower is sharper."})
    per_layer: bool = field(default=True, metadata={
        "help": "A gate per decoder layer (true) or one gate shared by all layers (false)."})
    bias: bool = field(default=True, metadata={"help": "Gates have a bias (a per-layer prior over experts)."})
    init_std: float = field(default=0.01, metadata={
        "help": "Std of the gates' initial weights: near-uniform routing at the start."})
    entropy_weight: float = field(default=0.0, metadata={
        "help": "Adds w * mean routing entropy to the loss: > 0 sharpens routing, < 0 smooths it."})
    balance_weight: float = field(default=0.0, metadata={
        "help": "Adds w * E * sum_i f_i P_i (Switch-style load balance) to the loss; > 0 spreads tokens over "
                "experts. Recommended with top_k, where unchosen experts otherwise get no gradient."})

    def validate(self, n_experts: int) -> None:
        if self.granularity not in GRANULARITIES:
            raise UserError(f"router.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.gate not in GATES:
            raise UserError(f"router.gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.null_expert and self.gate != "softmax":
            raise UserError("router.null_expert needs router.gate=softmax (tanh gates can already reach 0)")
        slots = self.n_slots(n_experts)
        if self.top_k is not None and not 1 <= self.top_k <= slots:
            raise UserError(f"router.top_k must be between 1 and the number of experts"
                            f"{' + the null expert' if self.null_expert else ''} ({slots}), got {self.top_k}")
        if self.temperature <= 0:
            raise UserError(f"router.temperature must be > 0, got {self.temperature}")
        if self.init_std < 0:
            raise UserError(f"router.init_std must be >= 0, got {self.init_std}")
        if self.gate == "tanh" and (self.entropy_weight or self.balance_weight):
            raise UserError("router.entropy_weight and router.balance_weight are defined for softmax gates only")

    def n_slots(self, n_experts: int) -> int:
        """Columns of the gate: the experts, plus the null expert when enabled."""
        return n_experts + int(self.null_expert)


@dataclass
class ExpertWeights:
    """One LoRA expert as plain tensors: module name -> (A [r, in], B [out, r], scaling)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    source: str | None = None  # the PEFT adapter directory it was read from


# --------------------------------------------------------------------------- the gates


class SafetyRouter(nn.Module):
    """The only trainable part of SafeMoE: one linear gate per decoder layer (or one shared).

    The gate reads the RMS-normalised hidden state, so the temperature means the same at
    every layer and a shared gate is not dominated by the layers with the largest norms.
    """

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, settings: RouterSettings):
        super().__init__()
        settings.validate(n_experts)
        self.settings = settings
        self.hidden_size, self.n_experts, self.n_layers = hidden_size, n_experts, n_layers
        n_gates = n_layers if settings.per_layer else 1
        self.n_slots = settings.n_slots(n_experts)
        self.weight = nn.Parameter(torch.randn(n_gates, self.n_slots, hidden_size) * settings.init_std)
        self.bias = nn.Parameter(torch.zeros(n_gates, self.n_slots)) if settings.bias else None

    def extra_repr(self) -> str:
        s = self.settings
        return (f"experts={self.n_experts}, layers={self.n_layers}, per_layer={s.per_layer}, "
                f"granularity={s.granularity}, gate={s.gate}, null_expert={s.null_expert}, top_k={s.top_k}, "
                f"temperature={s.temperature}")

    @staticmethod
    def features(h: torch.Tensor) -> torch.Tensor:
        """RMS-normalised hidden states in float32 (the gates' input)."""
        return F.rms_norm(h.float(), (h.shape[-1],), eps=_EPS)

    def logits(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        g = layer if self.settings.per_layer else 0
        z = F.linear(features, self.weight[g], None if self.bias is None else self.bias[g])
        return z / self.settings.temperature if self.settings.temperature != 1.0 else z

    def probs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights used to mix the slots, full weights), one column per slot (the experts, then
        the null expert if any). They differ only in top-k mode, where exactly k weights are
        non-zero (softmax: renormalised to sum to 1)."""
        k = self.settings.top_k
        if self.settings.gate == "tanh":
            full = torch.tanh(logits)
            if k is None or k >= self.n_slots:
                return full, full
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, full.abs().topk(k, dim=-1).indices, True)
            return full * keep, full
        full = torch.softmax(logits, dim=-1)
        if k is None or k >= self.n_slots:
            return full, full
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
        return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1), full


# --------------------------------------------------------------------------- routed linears


class LayerRouting:
    """Routing state shared by the routed linears of one decoder layer during its forward."""

    def __init__(self, index: int, name: str):
        self.index = index  # gate index (position among the routed decoder layers)
        self.name = name  # module name of the decoder layer
        self.active = False  # True between the layer's pre- and post-forward hooks
        self.gate: torch.Tensor | None = None  # [B*T, E, 1]; None = experts disabled


class RoutedLinear(nn.Module):
    """A frozen base Linear plus E stacked LoRA experts mixed by the layer's gate."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, n_experts: int,
                 routing: LayerRouting):
        super().__init__()
        self.base_layer = base
        self.n_experts = n_experts
        self.rank = lora_A.shape[1] // n_experts
        # Buffers, not parameters: experts are data the router mixes, and they can never be
        # trained (or have requires_grad flipped) by accident. Not in state_dict: the bundle
        # keeps them as the original PEFT adapter directories.
        self.register_buffer("lora_A", lora_A, persistent=False)  # [in, E*r]
        self.register_buffer("lora_B", lora_B, persistent=False)  # [E*r, out], scaling folded in
        self.routing = routing

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, rank={self.rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.routing
        if not routing.active:
            raise RuntimeError(f"SafeMoE: a routed module of {routing.name} was called outside that decoder "
                               "layer's forward; its routing gate comes from the layer's input")
        gate = routing.gate  # [N, E, 1] for the N = batch * tokens rows of x, prepared once per layer
        if gate is None:  # experts disabled
            return out
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        # every expert's A x at once, then each expert's rank block scaled by its gate
        z = torch.mm(x.reshape(-1, x.shape[-1]), self.lora_A).view(-1, self.n_experts, self.rank)
        z = z * gate if torch.is_grad_enabled() else z.mul_(gate)
        # out += z B in one fused kernel, in place: the base layer's fresh output buffer is ours
        # (autograd allows it: a Linear does not keep its output for backward)
        lora_B = self.lora_B if self.lora_B.dtype == out.dtype else self.lora_B.to(out.dtype)
        out.view(-1, out.shape[-1]).addmm_(z.view(z.shape[0], -1).to(out.dtype), lora_B)
        return out


def stack_experts(module_name: str, base: nn.Linear, experts: Sequence[ExpertWeights]) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Stack the experts' LoRA factors of one module into (A [in, E*r], B [E*r, out]).

    Experts may have different ranks (zero-padded to the largest) and may not adapt this
    module at all (an all-zero block): both contribute exactly nothing.
    """
    E = len(experts)
    rank = max(e.modules[module_name][0].shape[0] for e in experts if module_name in e.modules)
    w = base.weight
    A = torch.zeros(E, rank, base.in_features, dtype=w.dtype, device=w.device)
    B = torch.zeros(E, base.out_features, rank, dtype=w.dtype, device=w.device)
    for i, e in enumerate(experts):
        if module_name not in e.modules:
            continue
        a, b, scaling = e.modules[module_name]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
            raise UserError(f"expert {e.name!r}: LoRA shapes for {module_name} (A {tuple(a.shape)}, "
                            f"B {tuple(b.shape)}) do not fit the base layer "
                            f"({base.in_features} -> {base.out_features}); was it trained on another model?")
        r = a.shape[0]
        A[i, :r] = a.to(A)
        B[i, :, :r] = (b.float() * scaling).to(B)
    return A.reshape(E * rank, base.in_features).T.contiguous(), B.permute(0, 2, 1).reshape(E * rank,
                                                                                           base.out_features)


def decoder_layer_of(model: nn.Module, module_name: str) -> str:
    """Name of the decoder layer holding a module (`<layers>.<index>`, the layer list from the
    architecture table)."""
    prefix, layers = architectures.decoder_layers(model)
    rest = module_name[len(prefix) + 1:] if module_name.startswith(prefix + ".") else ""
    index = rest.split(".", 1)[0]
    if index.isdigit() and int(index) < len(layers):
        return f"{prefix}.{index}"
    raise UserError(f"SafeMoE can only route modules inside decoder layers ({prefix}.N); {module_name} is not in one")


def hidden_size_of(model: nn.Module) -> int:
    return architectures.hidden_size(model)


# --------------------------------------------------------------------------- the controller


@dataclass
class _Call:
    """What the top-level forward pre-hook learned about the current call."""

    token_mask: torch.Tensor | None  # [B, T] bool: attended (non-padding) tokens of this call
    prompt_mask: torch.Tensor | None  # [B, T] bool: tokens that define a sequence's static routing
    decoding: bool  # sequence mode: the prompt of this sequence has been seen; reuse its routing
    record: list[tuple[int, torch.Tensor]] | None = None


class RoutingRecord:
    """Routing weights recorded during `SafeMoE.record()`: one [L, B, T, E] tensor per forward call."""

    def __init__(self, layer_names: list[str], expert_names: list[str]):
        self.layer_names = layer_names
        self.expert_names = expert_names
        self.calls: list[torch.Tensor] = []

    def per_token(self, row: int = 0) -> torch.Tensor:
        """[T_total, L, E] weights of one batch row across all recorded calls (prefill + decode steps).

        Rows must stay put between calls (true for model.generate; not for HFGenerator,
        which drops finished rows): record with batch size 1 when in doubt."""
        if not self.calls:
            return torch.zeros(0, len(self.layer_names), len(self.expert_names))
        return torch.cat([c[:, row] for c in self.calls], dim=1).permute(1, 0, 2)


class SafeMoE:
    """Owns the routed layers, the router and the hooks of one model. Attach with `attach_safemoe`."""

    def __init__(self, model: nn.Module, router: SafetyRouter, layers: dict[str, LayerRouting],
                 routed: dict[str, RoutedLinear], experts: list[ExpertWeights], base_model: str | None):
        self.model = model
        self.router = router
        self.layers = layers  # decoder-layer name -> its routing state
        self.routed = routed  # module name -> RoutedLinear
        self.expert_names = [e.name for e in experts]
        self.expert_sources = [e.source for e in experts]
        self.base_model = base_model
        self.collect_aux = False  # keep gates with grad for the regularisers (router training)
        self._aux: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._enabled = True
        self._call: _Call | None = None
        self._record: RoutingRecord | None = None
        self._handles: list[Any] = []
        self._trainable_before: set[str] = set()  # parameters that trained before SafeMoE froze them

    @property
    def settings(self) -> RouterSettings:
        return self.router.settings

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def slot_names(self) -> list[str]:
        """Names of the routing columns: the experts, then the null expert when there is one."""
        return [*self.expert_names, *([NULL_SLOT] if self.settings.null_expert else [])]

    # ------------------------------------------------------------ public controls

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone: no expert contributes (unlike X-LoRA's disable_adapter)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    @contextlib.contextmanager
    def record(self) -> Iterator[RoutingRecord]:
        """Record the routing weights of every forward call inside the block."""
        rec = RoutingRecord(list(self.layers), self.slot_names)
        previous, self._record = self._record, rec
        try:
            yield rec
        finally:
            self._record = previous

    def aux_loss(self) -> torch.Tensor:
        """The regularisers over the gates of the last forward call (needs `collect_aux`)."""
        s = self.settings
        total = self.router.weight.new_zeros(())
        if not self._aux or (s.entropy_weight == 0 and s.balance_weight == 0):
            return total
        entropy = balance = total
        for used, full, mask in self._aux:
            w = torch.ones(full.shape[:-1], device=full.device) if mask is None else mask.float()
            if w.shape[1] != full.shape[1]:  # sequence routing: one gate per row
                w = w.amax(dim=1, keepdim=True)
            w = w.unsqueeze(-1)
            n = w.sum().clamp(min=1)
            token_entropy = -(full * full.clamp(min=1e-9).log()).sum(-1, keepdim=True)
            entropy = entropy + (token_entropy * w).sum() / n
            usage = (used * w).sum((0, 1)) / n  # f_i: share of routing weight expert i receives
            prob = (full * w).sum((0, 1)) / n  # P_i: mean router probability of expert i
            balance = balance + full.shape[-1] * (usage * prob).sum()
        k = len(self._aux)
        return s.entropy_weight * entropy / k + s.balance_weight * balance / k

    def remove(self) -> nn.Module:
        """Take SafeMoE off the model: original linears back, hooks and router removed,
        requires_grad as it was before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, routed in self.routed.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, routed.base_layer)
        if hasattr(self.model, ROUTER_ATTR):
            delattr(self.model, ROUTER_ATTR)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self._trainable_before)
        self.model.__dict__.pop("safemoe", None)
        return self.model

    # ------------------------------------------------------------ hooks

    def _install_hooks(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model, with_kwargs=True))
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if isinstance(head, nn.Linear):
            # PyTorch's matmul does not fold a non-contiguous [B, T, d] input into one mm when the
            # weight does not require grad: it broadcasts the weight into a bmm, ~5x slower for the
            # LM head on the [B, 1, d] slice `logits_to_keep` takes at prefill. SafeMoE freezes the
            # base model, so hand the head a contiguous copy (B*d floats) instead.
            self._handles.append(head.register_forward_pre_hook(_contiguous_input))
        for name, state in self.layers.items():
            layer = self.model.get_submodule(name)
            self._handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, state=state: self._before_layer(state, a, kw), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(
                lambda m, a, kw, out, state=state: self._after_layer(state), with_kwargs=True))

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._aux = []
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._call = None
            return
        T = ids.shape[1]
        mask = kwargs.get("attention_mask")
        token_mask = mask[:, -T:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        prompt_mask = token_mask
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == ids.shape[:2]:
            # Training / scoring: the prompt is what carries no loss (IGNORE_INDEX), minus padding.
            prompt_mask = labels.eq(-100) if prompt_mask is None else prompt_mask & labels.eq(-100)
        cache = cache_in(kwargs)
        decoding = getattr(cache, _STATIC_ATTR, None) is not None and T == 1
        self._call = _Call(token_mask, prompt_mask, decoding, [] if self._record is not None else None)

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is not None and call.record and self._record is not None:
            self._record.calls.append(torch.stack([g for _, g in sorted(call.record, key=lambda x: x[0])]))

    def _before_layer(self, state: LayerRouting, args: tuple, kwargs: dict) -> None:
        state.active = True
        if not self._enabled:
            state.gate = None
            return
        h = args[0] if args else kwargs["hidden_states"]
        call = self._call
        if self.settings.granularity == "sequence":
            used, full = self._sequence_gate(state, h, cache_in(kwargs), call)
        else:
            used, full = self.router.probs(self.router.logits(self.router.features(h), state.index))
        # [B*T, E, 1]: one row per token of the layer's linears, ready to scale each expert's rank block
        # (the null expert's column, if any, is the last one and scales nothing)
        experts_used = used[..., : self.n_experts]
        state.gate = experts_used.to(h.dtype).expand(*h.shape[:2], -1).reshape(-1, self.n_experts, 1)
        if self.collect_aux and torch.is_grad_enabled():
            self._aux.append((used, full, call.token_mask if call is not None else None))
        if call is not None and call.record is not None:
            call.record.append((state.index, used.detach().float().expand(*h.shape[:2], -1).cpu()))

    @staticmethod
    def _after_layer(state: LayerRouting) -> None:
        state.active = False
        state.gate = None

    def _sequence_gate(self, state: LayerRouting, h: torch.Tensor, cache: Any,
                       call: _Call | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One gate per sequence from the mean RMS-normalised prompt hidden state entering this layer.

        Without a KV cache (training, scoring) the prompt is this call's tokens (those with
        label -100 when labels are given). With a cache, the prompt's running sum lives on
        the cache object, so it follows the cache through batch_select_indices /
        batch_repeat_interleave / reorder_cache, and is frozen from the first one-token call on.
        A prompt prefilled in several chunks (HFGenerator's shared template prefix) routes
        the earlier chunks with the mean of the tokens seen so far.
        """
        T = h.shape[1]
        static = _static_state(cache) if cache is not None else None
        decoding = call.decoding if call is not None else (static is not None and static.started and T == 1)
        if static is not None and decoding and state.index in static.sums:
            total, count = static.sums[state.index]
        else:
            mask = call.prompt_mask if call is not None else None
            if mask is None or mask.shape != h.shape[:2]:
                mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            w = mask.to(torch.float32).unsqueeze(-1)
            total, count = (self.router.features(h) * w).sum(1), w.sum(1)
            if static is not None:
                if state.index in static.sums:
                    prev_total, prev_count = static.sums[state.index]
                    total, count = total + prev_total, count + prev_count
                static.sums[state.index] = (total, count)
                static.started = True
        logits = self.router.logits(total / count.clamp(min=1), state.index)
        used, full = self.router.probs(logits)
        return used.unsqueeze(1), full.unsqueeze(1)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


class _StaticState:
    """Per-sequence routing sums of one KV cache: gate index -> (sum of features [B, d], count [B, 1])."""

    def __init__(self) -> None:
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.started = False

    def apply(self, fn: Any) -> None:
        self.sums = {k: (fn(t), fn(c)) for k, (t, c) in self.sums.items()}


def _static_state(cache: Any) -> _StaticState:
    """The per-sequence state of a cache, created on first use with the cache's batch
    reshaping methods wrapped so the state follows the cache's rows."""
    state = getattr(cache, _STATIC_ATTR, None)
    if state is not None:
        return state
    state = _StaticState()
    setattr(cache, _STATIC_ATTR, state)

    def wrap(method_name: str, fn: Any) -> None:
        original = getattr(cache, method_name, None)
        if original is None:
            return

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            state.apply(lambda t: fn(t, *args, **kwargs))
            return result

        setattr(cache, method_name, wrapped)

    wrap("batch_select_indices", lambda t, indices: t[indices.to(t.device)])
    wrap("reorder_cache", lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)))
    wrap("batch_repeat_interleave", lambda t, repeats: t.repeat_interleave(repeats, dim=0))
    reset = getattr(cache, "reset", None)
    if reset is not None:
        def wrapped_reset() -> Any:
            state.sums, state.started = {}, False
            return reset()

        cache.reset = wrapped_reset
    return state


# --------------------------------------------------------------------------- attaching


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def attach_safemoe(model: nn.Module, experts: Sequence[ExpertWeights], settings: RouterSettings | None = None, *,
                   base_model: str | None = None) -> SafeMoE:
    """Turn a plain causal LM into a SafeMoE model in place and return its controller
    (also reachable as `model.safemoe`; the router is the submodule `model.safemoe_router`).

    Everything but the router is frozen. The model keeps its class, so `generate`,
    `transformers.Trainer` and HFGenerator work as before.
    """
    settings = settings or RouterSettings()
    if not experts:
        raise UserError("SafeMoE needs at least one expert")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise UserError(f"expert names must be unique, got {', '.join(names)}")
    if getattr(model, "safemoe", None) is not None:
        raise UserError("this model already has SafeMoE attached; call model.safemoe.remove() first")
    if hasattr(model, "peft_config"):
        raise UserError("attach SafeMoE to a plain base model, not a PEFT-wrapped one")
    settings.validate(len(experts))

    module_names = sorted({m for e in experts for m in e.modules}, key=_natural_key)
    missing = [m for m in module_names if not _has_module(model, m)]
    if missing:
        raise UserError(f"expert modules not found in the base model: {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else "") + "; were the experts trained on another model?")
    layer_names = sorted({decoder_layer_of(model, m) for m in module_names}, key=_natural_key)
    layers = {name: LayerRouting(i, name) for i, name in enumerate(layer_names)}

    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    routed: dict[str, RoutedLinear] = {}
    for name in module_names:
        base = model.get_submodule(name)
        if type(base) is not nn.Linear:
            raise UserError(f"SafeMoE routes nn.Linear modules only; {name} is a {type(base).__name__}")
        A, B = stack_experts(name, base, experts)
        routed[name] = RoutedLinear(base, A, B, len(experts), layers[decoder_layer_of(model, name)])
        parent, child = _parent(model, name)
        setattr(parent, child, routed[name])

    w = next(model.parameters())
    router = SafetyRouter(hidden_size_of(model), len(experts), len(layers), settings).to(w.device)
    setattr(model, ROUTER_ATTR, router)
    moe = SafeMoE(model, router, layers, routed, list(experts), base_model)
    moe._trainable_before = trainable_before
    moe._install_hooks()
    model.__dict__["safemoe"] = moe  # a plain attribute, not a submodule
    return moe


def get_safemoe(model: nn.Module) -> SafeMoE:
    moe = getattr(model, "safemoe", None)
    if not isinstance(moe, SafeMoE):
        raise UserError("this model has no SafeMoE attached")
    return moe


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
