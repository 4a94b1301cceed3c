"""What the guard covers of what the fine-tuning trains.

A guard only constrains the modules it was given; whatever else is trained can still move
refusal. The report lists the trained units -- LoRA-adapted modules, or with full fine-tuning
every trainable parameter -- as name patterns over decoder layers (`model.layers.*.mlp.up_proj`
with the layer indices), split into guarded and unguarded, and for every guarded module the
measured orthogonality residual of its update:

    input-side constraint   max |delta_W B|     (the update reads nothing along the basis B)
    output-side constraint  max |B^T delta_W|   (the update writes nothing into B)

measured on delta_W itself (the LoRA product s B A, or W - W_0 for full fine-tuning, whose
W_0 B / B^T W_0 the constraint keeps as its target), not on the factors the guard projects.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tactful import architectures
from tactful.errors import UserError


def layer_pattern(model: Any, name: str) -> tuple[str, int | None]:
    """('model.layers.*.mlp.up_proj', 3) for 'model.layers.3.mlp.up_proj'; (name, None) outside the layers."""
    prefix, _ = architectures.decoder_layers(model)
    m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", name)
    return (f"{prefix}.*.{m.group(2)}", int(m.group(1))) if m else (name, None)


def trained_units(model: Any, adapter: str = "default") -> list[str]:
    """Names (relative to the transformers model) of the LoRA-adapted modules of `adapter`, or,
    without LoRA, of the trainable parameters."""
    base = architectures.unwrap(model)
    lora = [n for n, m in base.named_modules() if getattr(m, "lora_A", None) is not None and adapter in m.lora_A
            and m.lora_A[adapter].weight.requires_grad]
    if lora:
        return lora
    return [n for n, p in base.named_parameters() if p.requires_grad]


def _unit(c: Any) -> str:
    """The unit a constraint guards: its module for LoRA factors, its parameter otherwise."""
    return c.module if c.name.endswith((".lora_A", ".lora_B")) else c.name


@torch.no_grad()
def update_residual(model: Any, c: Any, adapter: str = "default") -> float:
    """Orthogonality residual of the update of constraint c's module (see the module doc)."""
    if not c.name.endswith((".lora_A", ".lora_B")):
        return c.residual()  # W B - W_0 B (or B^T W - B^T W_0): exactly the update's residual
    from tactful.methods.refusal_guard.guard import effective_delta, in_space_residual, out_space_residual

    mod = architectures.unwrap(model).get_submodule(c.module)
    delta = effective_delta(mod, adapter)
    return in_space_residual(delta, c.basis) if c.side == "in" else out_space_residual(delta, c.basis)


def _group(model: Any, names: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for n in names:
        pattern, layer = layer_pattern(model, n)
        layers = out.setdefault(pattern, [])
        if layer is not None:
            layers.append(layer)
    return {p: sorted(set(v)) for p, v in sorted(out.items())}


def coverage_report(model: Any, guard: Any | None, *, adapter: str = "default", measure: bool = True) -> dict[str, Any]:
    """{"guarded": {pattern: {layers, constraints, max_update_residual}}, "unguarded": {pattern: {layers}},
    "update_residuals": {module/parameter: {"<space>:<side>": residual}}, "max_update_residual"}."""
    units = trained_units(model, adapter)
    constraints = list(guard.constraints) if guard is not None else []
    by_unit: dict[str, list[Any]] = {}
    for c in constraints:
        by_unit.setdefault(_unit(c), []).append(c)
    guarded = [u for u in units if u in by_unit]
    unguarded = [u for u in units if u not in by_unit]
    residuals: dict[str, dict[str, float]] = {}
    if measure:
        for u in guarded:
            for c in by_unit[u]:
                key = f"{c.space}:{c.side}"
                residuals.setdefault(u, {})[key] = max(residuals.get(u, {}).get(key, 0.0),
                                                      update_residual(model, c, adapter))
    report_guarded = {}
    for pattern, layers in _group(model, guarded).items():
        members = [u for u in guarded if layer_pattern(model, u)[0] == pattern]
        kinds = sorted({f"{c.space}:{c.side}" for u in members for c in by_unit[u]})
        entry: dict[str, Any] = {"layers": layers, "constraints": kinds}
        if measure:
            entry["max_update_residual"] = max((v for u in members for v in residuals.get(u, {}).values()),
                                               default=0.0)
        report_guarded[pattern] = entry
    out: dict[str, Any] = {
        "trained": len(units),
        "guarded": report_guarded,
        "unguarded": {p: {"layers": layers} for p, layers in _group(model, unguarded).items()},
    }
    if measure:
        out["update_residuals"] = residuals
        out["max_update_residual"] = max((v for r in residuals.values() for v in r.values()), default=0.0)
    return out


def describe_unguarded(report: dict[str, Any]) -> str:
    """'model.layers.*.mlp.up_proj (layers 0-29), model.embed_tokens.weight' for an error message."""
    parts = []
    for pattern, entry in report["unguarded"].items():
        layers = entry["layers"]
        parts.append(f"{pattern} ({layer_ranges(layers)})" if layers else pattern)
    return ", ".join(parts)


def layer_ranges(layers: list[int]) -> str:
    """'layers 0-3, 7' for [0, 1, 2, 3, 7]."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"layer{'s' if len(layers) > 1 else ''} {text}"


def require_full_coverage(report: dict[str, Any]) -> None:
    """guard.strict: refuse to train modules the guard does not constrain."""
    if report["unguarded"]:
        raise UserError("guard.strict=true: the fine-tuning trains modules the guard does not protect: "
                        f"{describe_unguarded(report)}; set guard.train_only_guarded=true to train only the "
                        "guarded ones, guard.coverage=residual to guard every reader and writer of the residual "
                        "stream, or guard.strict=false to allow it")
