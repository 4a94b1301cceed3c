"""The guard: fine-tuning updates that cannot move the protected refusal subspace.

Per guarded layer, U [d_in, k] is an orthonormal basis (QR) of the kept latents' decoder
directions in the o_proj input space z, and P = I - U U^T.

o_proj (reads z)        delta_W <- delta_W P     so the layer's output for any z in span(U)
                                                 is exactly what it was
v_proj (writes z)       delta_W <- P_v delta_W   so the update never writes into span(U)

What "writes into that space" means for v_proj, with grouped KV heads
---------------------------------------------------------------------
z = [z_1 .. z_H] with z_h = sum_t a_{h,t} v_{g(h),t}: head h reads KV head g(h) = h // (H / H_kv),
each with its own attention weights a_h. A change dv_g of one KV head's values moves
U^T z by sum_h sum_t a_{h,t} U_h^T dv_{g(h),t}, where U_h is head h's slice of U [head_dim, k].
Because the a_h differ per head, that is zero for every input only if U_h^T dv_g = 0 for
*each* head h reading g -- not merely for their sum. So the value-side basis is block-
diagonal over KV heads: Q_g = orthonormal basis of [U_h for h in group g] ([head_dim, <= k*group]),
P_v = I - Q Q^T on v_proj's n_kv_heads*head_dim outputs. (This is stricter than P itself
even without GQA: P on v_proj's output would only cancel the sum over heads.)

That is `value_mode="per_head"`, the default, exact for every input. Its price: the group's
constraint has rank up to k * heads_per_group, so with many latents it can span all of
head_dim and freeze that KV head's v_proj (SmolLM2-135M: 3 query heads per KV head of dim 64,
so more than ~21 latents freeze it); `describe()` says when. `value_mode="shared"` keeps only
Q_g = basis of sum_{h in g} U_h (rank <= k): exact only if the heads of a group attended
identically, an approximation that leaves v_proj more freedom.

How the constraint is kept
--------------------------
LoRA (delta_W = s B A): for o_proj keep A's rows orthogonal to U (A <- A P, so B A P =
(B A) P); for v_proj keep B's columns orthogonal to Q (B <- P_v B). Exact whatever B (resp. A) is.

Full fine-tuning: the constraint is W U = W_0 U (o_proj) and Q^T W = Q^T W_0 (v_proj, and
its bias). Projecting gradients is not enough under Adam: its update m / (sqrt(v) + eps) is
elementwise, so a gradient with no component in span(U) still produces an update with one
(weight decay adds another). We therefore project gradients (so Adam's moments and the
clipping norm see only allowed directions) *and* project the parameters back onto the
constraint set after every optimizer step: W <- W - (W U - W_0 U) U^T. Only W_0 U is stored
([out, k]), not W_0.

The same machinery guards the residual stream at every trained layer (`residual=`, see
residual.py: readers on their input side, writers on their output side); coverage.py reports
which trained modules are guarded.

Both are idempotent, so applying them after every step (a Trainer callback), at the start of
training and after resuming is safe. With sharded parameters (FSDP, ZeRO-3) the callback
would see shards: use DDP or LoRA there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from tactful.errors import UserError
from tactful.methods.refusal_guard.capture import HeadLayout, attention_sites, head_layout, projection_in_features

SIDES = ("o_proj", "v_proj")
# The LoRA role of each side's module (guard.train_only_guarded trains only these).
SIDE_ROLES = {"o_proj": "attn_out", "v_proj": "attn_v"}
VALUE_MODES = ("per_head", "shared")


# ---------------------------------------------------------------- bases

def orthonormal_basis(directions: torch.Tensor, *, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [d, r] of the column span of `directions` [d, k] (QR; an SVD when the
    columns are linearly dependent, so the basis spans exactly their span)."""
    d = directions.double()
    if d.shape[1] == 0:
        return d.new_zeros(d.shape[0], 0).float()
    q, r = torch.linalg.qr(d)
    diag = r.diagonal().abs()
    if diag.min() > tol * max(diag.max().item(), 1e-30) and d.shape[1] <= d.shape[0]:
        return q.float()
    u, s, _ = torch.linalg.svd(d, full_matrices=False)
    return u[:, s > tol * s[0]].float().contiguous()


def projector(U: torch.Tensor) -> torch.Tensor:
    """P = I - U U^T."""
    return torch.eye(U.shape[0], dtype=U.dtype) - U @ U.T


def value_basis(U: torch.Tensor, layout: HeadLayout, *, mode: str = "per_head", tol: float = 1e-6) -> torch.Tensor:
    """Block-diagonal orthonormal basis on v_proj's output [n_kv*head_dim, r] (see module doc)."""
    if U.shape[0] != layout.d_in:
        raise UserError(f"subspace dimension {U.shape[0]} != n_heads * head_dim = {layout.d_in}")
    if mode not in VALUE_MODES:
        raise UserError(f"unknown value_mode {mode!r}; choose one of {', '.join(VALUE_MODES)}")
    hd = layout.head_dim
    blocks = []
    for g in range(layout.n_kv_heads):
        slices = [U[h * hd:(h + 1) * hd] for h in range(g * layout.group_size, (g + 1) * layout.group_size)]
        m = torch.cat(slices, dim=1) if mode == "per_head" else torch.stack(slices).sum(0)
        q = orthonormal_basis(m, tol=tol) if m.abs().max() > 0 else m.new_zeros(hd, 0)
        block = torch.zeros(layout.n_kv_heads * hd, q.shape[1])
        block[g * hd:(g + 1) * hd] = q
        blocks.append(block)
    return torch.cat(blocks, dim=1)


@dataclass
class Subspace:
    """The protected subspace of one layer: U in z-space, and its value-side counterpart."""

    layer: int
    U: torch.Tensor  # [d_in, k], orthonormal
    U_value: torch.Tensor | None = None  # [n_kv*head_dim, r], orthonormal, block-diagonal

    @classmethod
    def from_directions(cls, layer: int, directions: torch.Tensor, layout: HeadLayout | None = None, *,
                        value_mode: str = "per_head") -> "Subspace":
        U = orthonormal_basis(directions)
        return cls(layer=layer, U=U, U_value=value_basis(U, layout, mode=value_mode) if layout is not None else None)


def subspaces_from_saes(saes: Mapping[int, Any], kept: Mapping[int, Sequence[int]], layout: HeadLayout | None, *,
                        value_mode: str = "per_head") -> dict[int, Subspace]:
    """One Subspace per layer from the kept latents' decoder directions (layers with none are skipped)."""
    out = {}
    for layer, latents in kept.items():
        if latents:
            out[layer] = Subspace.from_directions(layer, saes[layer].decoder_directions(latents), layout,
                                                  value_mode=value_mode)
    return out


def save_subspaces(subspaces: Mapping[int, Subspace], path: Any) -> None:
    """U (and U_value) per layer in one safetensors file (`layer_12.U`, `layer_12.U_value`), written atomically."""
    from safetensors.torch import save

    from tactful.io import atomic_write_bytes

    tensors = {}
    for layer, s in sorted(subspaces.items()):
        tensors[f"layer_{layer}.U"] = s.U.float().contiguous()
        if s.U_value is not None:
            tensors[f"layer_{layer}.U_value"] = s.U_value.float().contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"format": "tactful-refusal-guard"}))


def load_subspaces(path: Any) -> dict[int, Subspace]:
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out: dict[int, Subspace] = {}
    for key, t in raw.items():
        name, _, kind = key.partition(".")
        layer = int(name.split("_", 1)[1])
        s = out.setdefault(layer, Subspace(layer=layer, U=torch.empty(0)))
        if kind == "U":
            s.U = t
        else:
            s.U_value = t
    return out


# ---------------------------------------------------------------- constraints

@dataclass
class Constraint:
    """Keep `basis`-components of a parameter fixed: along dim 1, p B = target; along dim 0, B^T p = target."""

    name: str
    param: torch.nn.Parameter
    basis: torch.Tensor  # orthonormal columns
    dim: int  # 1: the basis acts on the parameter's input side (columns); 0: on its rows
    target: torch.Tensor | None  # None means 0 (LoRA factors)
    module: str = ""  # the module the parameter belongs to (for the coverage report)
    side: str = ""  # "in" / "out": the module's input or output space (dim is swapped for Conv1D)
    space: str = "attention"  # "attention" (the SAE's z space) or "residual" (residual.py)

    def _basis_on(self, device: torch.device) -> torch.Tensor:
        if self.basis.device != device or self.basis.dtype != torch.float32:
            self.basis = self.basis.to(device, torch.float32)  # moved once, not every step
            if self.target is not None:
                self.target = self.target.to(device)
        return self.basis

    @torch.no_grad()
    def project_(self) -> None:
        # In float32 even for bf16 weights; the cast back then limits exactness to bf16 precision.
        p = self.param.data
        B = self._basis_on(p.device)
        pf = p.float()
        if self.dim == 1:
            coef = pf @ B
            if self.target is not None:
                coef = coef - self.target.to(p.device)
            pf = pf - coef @ B.T
        else:
            coef = B.T @ pf
            if self.target is not None:
                coef = coef - self.target.to(p.device)
            pf = pf - B @ coef
        p.copy_(pf.to(p.dtype))

    def project_grad(self, grad: torch.Tensor) -> torch.Tensor:
        B = self._basis_on(grad.device)
        g = grad.float()
        g = g - (g @ B) @ B.T if self.dim == 1 else g - B @ (B.T @ g)
        return g.to(grad.dtype)

    @torch.no_grad()
    def residual(self) -> float:
        """max |p B - target| (dim 1) or |B^T p - target| (dim 0): 0 when the constraint holds."""
        pf = self.param.data.float()
        B = self._basis_on(pf.device)
        coef = pf @ B if self.dim == 1 else B.T @ pf
        if self.target is not None:
            coef = coef - self.target.to(pf.device)
        return float(coef.abs().max()) if coef.numel() else 0.0


def _lora_parts(mod: Any, adapter: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter] | None:
    lora_a = getattr(mod, "lora_A", None)
    if lora_a is None or adapter not in lora_a:
        return None
    if getattr(mod, "use_dora", {}).get(adapter, False):
        raise UserError("the refusal guard does not support DoRA: its magnitude vector rescales whole columns")
    return mod.lora_A[adapter].weight, mod.lora_B[adapter].weight


def _is_conv1d(mod: Any) -> bool:
    return type(getattr(mod, "base_layer", mod)).__name__ == "Conv1D"  # GPT-2 stores weight as [in, out]


class SubspaceGuard:
    """Holds the constraints for a model being fine-tuned; `project_()` restores them all."""

    def __init__(self, model: Any, subspaces: Mapping[int, Subspace], *, sides: Sequence[str] = SIDES,
                 adapter_name: str = "default", project_gradients: bool = True, value_mode: str = "per_head",
                 residual: Mapping[int, torch.Tensor] | None = None):
        """`residual`: {layer: U_l [d_model, k]} to also guard every trained reader and writer of
        the residual stream at those layers (residual.py); None keeps the attention-side guard only."""
        unknown = [s for s in sides if s not in SIDES]
        if unknown:
            raise UserError(f"unknown guard side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
        self.constraints: list[Constraint] = []
        self.notes: list[str] = []
        self._handles: list[Any] = []
        layout = head_layout(model)
        for site in attention_sites(model, sorted(subspaces), value="v_proj" in sides):
            sub = subspaces[site.layer]
            if sub.U.shape[1] == 0:
                continue
            d_in = projection_in_features(site.out_proj)
            if sub.U.shape[0] != d_in:
                raise UserError(f"layer {site.layer}: protected subspace has dimension {sub.U.shape[0]} but the "
                                f"o_proj input has {d_in} features (SAE from another model?)")
            if "o_proj" in sides:
                self.add(site.out_name, site.out_proj, sub.U, side="in", adapter=adapter_name)
            if "v_proj" in sides:
                if site.value_proj is None:
                    self.notes.append(f"layer {site.layer}: no separate value projection (fused qkv); "
                                      "only the o_proj side is guarded")
                    continue
                Uv = sub.U_value if sub.U_value is not None else value_basis(sub.U, layout, mode=value_mode)
                if Uv.shape[0] != _out_features(site.value_proj):
                    raise UserError(f"layer {site.layer}: value basis has {Uv.shape[0]} rows but "
                                    f"{site.value_name} has {_out_features(site.value_proj)} outputs")
                hd = layout.head_dim
                full = [g for g in range(layout.n_kv_heads) if torch.linalg.matrix_rank(Uv[g * hd:(g + 1) * hd]) >= hd]
                if full:
                    self.notes.append(f"layer {site.layer}: v_proj frozen for KV head(s) {full} (the per-head "
                                      "constraints span all of head_dim)")
                self.add(site.value_name, site.value_proj, Uv, side="out", adapter=adapter_name)
        if residual:
            from tactful.methods.refusal_guard.residual import add_residual_constraints

            add_residual_constraints(self, model, residual, adapter_name=adapter_name)
        if project_gradients:
            for c in self.constraints:
                if c.param.requires_grad:
                    self._handles.append(c.param.register_hook(c.project_grad))

    def add(self, name: str, mod: Any, basis: torch.Tensor, *, side: str, adapter: str,
            space: str = "attention") -> None:
        """Guard module `name`. side 'in': the basis lives in the module's input space (the update
        must not read it); 'out': in its output space (the update must not write into it)."""
        tags = dict(module=name, side=side, space=space)
        parts = _lora_parts(mod, adapter)
        if parts is not None:
            lora_a, lora_b = parts  # A [r, in], B [out, r] (also for Conv1D bases)
            if side == "in":
                self.constraints.append(Constraint(f"{name}.lora_A", lora_a, basis, dim=1, target=None, **tags))
            else:
                self.constraints.append(Constraint(f"{name}.lora_B", lora_b, basis, dim=0, target=None, **tags))
            return
        base = getattr(mod, "base_layer", mod)
        w = base.weight
        if not w.requires_grad:
            self.notes.append(f"{name}: neither a LoRA target nor trainable; nothing to guard")
            return
        conv = _is_conv1d(mod)
        basis = basis.to(w.device, torch.float32)
        # Linear weight is [out, in]: the input side is dim 1. Conv1D is [in, out]: swapped.
        dim = (1 if side == "in" else 0) if not conv else (0 if side == "in" else 1)
        target = (w.detach().float() @ basis) if dim == 1 else (basis.T @ w.detach().float())
        self.constraints.append(Constraint(f"{name}.weight", w, basis, dim=dim, target=target.clone(), **tags))
        bias = getattr(base, "bias", None)
        if side == "out" and bias is not None and bias.requires_grad:
            # a writer's bias is added at every position (the value bias to every v_t), so it
            # writes into the protected space like the weight does
            b_target = basis.T @ bias.detach().float()[:, None]
            self.constraints.append(_BiasConstraint(f"{name}.bias", bias, basis, dim=0, target=b_target.clone(),
                                                    **tags))

    # ------------------------------------------------------------ use
    @torch.no_grad()
    def project_(self) -> None:
        for c in self.constraints:
            c.project_()

    def residuals(self) -> dict[str, float]:
        return {c.name: c.residual() for c in self.constraints}

    def max_residual(self) -> float:
        return max(self.residuals().values(), default=0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def describe(self) -> str:
        """One line per parameter pattern over layers (a residual guard holds hundreds of parameters)."""
        import re

        from tactful.methods.refusal_guard.coverage import layer_ranges

        groups: dict[tuple[str, str, str], list[tuple[str, int]]] = {}
        for c in self.constraints:
            m = re.search(r"\.(\d+)\.", c.name)
            pattern = c.name[:m.start()] + ".*." + c.name[m.end():] if m else c.name
            groups.setdefault((pattern, c.space, c.side), []).append((m.group(1) if m else "", c.basis.shape[1]))
        lines = [f"guarding {len(self.constraints)} parameter(s)"]
        for (pattern, space, side), members in groups.items():
            layers = sorted(int(layer) for layer, _ in members if layer)
            ranks = sorted({r for _, r in members})
            rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            lines.append(f"  {pattern}: {space} subspace, {side}put side, rank {rank}"
                         + (f", {layer_ranges(layers)}" if layers else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _BiasConstraint(Constraint):
    """A 1-D parameter treated as one column."""

    @torch.no_grad()
    def project_(self) -> None:
        p = self.param.data
        B = self._basis_on(p.device)
        coef = B.T @ p.float()[:, None] - self.target
        p.copy_((p.float() - (B @ coef)[:, 0]).to(p.dtype))

    def project_grad(self, grad: torch.Tensor) -> torch.Tensor:
        B = self._basis_on(grad.device)
        g = grad.float()
        return (g - B @ (B.T @ g)).to(grad.dtype)

    @torch.no_grad()
    def residual(self) -> float:
        B = self._basis_on(self.param.device)
        coef = B.T @ self.param.data.float()[:, None] - self.target
        return float(coef.abs().max()) if coef.numel() else 0.0


def _out_features(mod: Any) -> int:
    base = getattr(mod, "base_layer", mod)
    return base.out_features if isinstance(base, torch.nn.Linear) else base.weight.shape[1]


def guard_callback(guard: SubspaceGuard) -> Any:
    """A transformers TrainerCallback that re-applies the projection after every optimizer step."""
    from transformers import TrainerCallback

    class RefusalGuardCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            guard.project_()  # fresh LoRA A is random; a resumed checkpoint is re-checked

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            guard.project_()

    return RefusalGuardCallback()


# ---------------------------------------------------------------- verification helpers

@torch.no_grad()
def effective_delta(mod: Any, adapter: str = "default") -> torch.Tensor:
    """A LoRA module's weight update as an [out, in] matrix (PEFT's get_delta_weight, Conv1D transposed back)."""
    delta = mod.get_delta_weight(adapter)
    return delta.T if _is_conv1d(mod) else delta


def in_space_residual(delta: torch.Tensor, U: torch.Tensor) -> float:
    """max |delta_W U| for an [out, in] update: 0 when the update ignores span(U) on its input side."""
    return float((delta.float() @ U.to(delta.device)).abs().max())


def out_space_residual(delta: torch.Tensor, Q: torch.Tensor) -> float:
    """max |Q^T delta_W|: 0 when the update writes nothing into span(Q)."""
    return float((Q.to(delta.device).T @ delta.float()).abs().max())


def apply_to_model(model: Any, subspaces: Mapping[int, Subspace], **kw: Any) -> tuple[SubspaceGuard, Callable[[], None]]:
    """Convenience for custom loops: build the guard, project once, return (guard, step_hook)."""
    guard = SubspaceGuard(model, subspaces, **kw)
    guard.project_()
    return guard, guard.project_
