"""SafeMoE bundles: one directory that is the whole model on top of its base.

    experts/<domain>/        ordinary PEFT LoRA adapters (one per expert)
    router.safetensors       the router's gates
    safemoe_config.json      expert order and paths, router settings, routed layers, base model
    manifest.json            kind "safemoe", base_model, versions, ... (tactful.runs)

`load_safemoe(dir)` returns `(model, tokenizer)` ready for `generate`, tactful's
HFGenerator (`tactful eval --run DIR`, `tactful chat --run DIR`) or more router training.
`inspect(run_dir, prompt)` shows which experts fired on which tokens, as numbers and as
a heatmap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tactful.config import from_dict
from tactful.errors import UserError
from tactful.io import publish_dir, atomic_write_bytes, atomic_write_json
from tactful.methods.safemoe.experts import read_expert
from tactful.methods.safemoe.router import RouterSettings, SafeMoE, attach_safemoe, get_safemoe
from tactful.runs import RUN_LOADERS, RunDir

BUNDLE_FORMAT = "tactful-safemoe/1"
CONFIG_FILE = "safemoe_config.json"
ROUTER_FILE = "router.safetensors"
EXPERTS_DIR = "experts"


# --------------------------------------------------------------------------- saving


def bundle_config(moe: SafeMoE, base_model: str) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "base_model": base_model,
        "experts": [{"name": n, "path": f"{EXPERTS_DIR}/{n}"} for n in moe.expert_names],
        "router": asdict(moe.settings),
        "hidden_size": moe.router.hidden_size,
        "layers": list(moe.layers),
        "modules": list(moe.routed),
    }


def router_bytes(moe: SafeMoE) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in moe.router.state_dict().items()}
    return save(state, metadata={"format": BUNDLE_FORMAT})


def save_bundle(model: Any, target: str | os.PathLike, *, base_model: str | None = None,
                manifest: bool = True, manifest_extra: dict[str, Any] | None = None) -> Path:
    """Save a SafeMoE model as a bundle directory (experts copied from their adapter dirs).

    Every file is written atomically; manifest.json comes last. With `manifest=False` the
    caller (the training pipeline) writes its own, richer manifest.
    """
    moe = get_safemoe(model)
    base = base_model or moe.base_model
    if not base:
        raise UserError("save_bundle needs base_model= (the spec the base model loads from)")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name, source in zip(moe.expert_names, moe.expert_sources):
        dst = target / EXPERTS_DIR / name
        if source is None:
            raise UserError(f"expert {name!r} has no adapter directory to save from")
        if Path(source).resolve() != dst.resolve():
            copy_dir_atomic(Path(source), dst)
    atomic_write_bytes(target / ROUTER_FILE, router_bytes(moe))
    atomic_write_json(target / CONFIG_FILE, bundle_config(moe, base))
    if manifest:
        RunDir(target).write_manifest(kind="safemoe", base_model=base,
                                      extra={"experts": moe.expert_names, "router": ROUTER_FILE,
                                             "status": "complete", **(manifest_extra or {})})
    return target


def copy_dir_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- loading


def read_bundle_config(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(bundle_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{bundle_dir} is not a SafeMoE bundle (no {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"malformed {CONFIG_FILE} ({e.msg})", where=f"{path}:{e.lineno}") from None
    if cfg.get("format") != BUNDLE_FORMAT:
        raise UserError(f"unsupported bundle format {cfg.get('format')!r} (this tactful reads {BUNDLE_FORMAT})",
                        where=str(path))
    if not (Path(bundle_dir) / ROUTER_FILE).is_file():
        raise UserError(f"{bundle_dir} has no {ROUTER_FILE}: the router was never saved (unfinished run?)")
    return cfg


def attach_bundle(model: Any, bundle_dir: str | os.PathLike) -> SafeMoE:
    """Attach a bundle's experts and router to an already loaded base model (in place)."""
    from safetensors.torch import load_file

    d = Path(bundle_dir)
    cfg = read_bundle_config(d)
    experts = [read_expert(d / e["path"], e["name"]) for e in cfg["experts"]]
    settings = from_dict(RouterSettings, cfg["router"], where=str(d / CONFIG_FILE), path="router")
    moe = attach_safemoe(model, experts, settings, base_model=cfg["base_model"])
    if list(moe.layers) != cfg["layers"]:
        moe.remove()
        raise UserError(f"the base model's routed layers differ from the bundle's ({len(cfg['layers'])} layers "
                        f"saved); is {cfg['base_model']!r} the model the bundle was trained on?")
    state = load_file(str(d / ROUTER_FILE))
    try:
        moe.router.load_state_dict(state, strict=True)
    except RuntimeError as e:
        moe.remove()
        raise UserError(f"{ROUTER_FILE} does not fit this model: {str(e).splitlines()[0]}", where=str(d)) from None
    return moe


def load_safemoe(bundle_dir: str | os.PathLike, **load_kw: Any) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a SafeMoE bundle in one call: base model (tactful.models.load_model,
    keywords such as dtype/device pass through) + experts + router."""
    from tactful.models import load_model

    cfg = read_bundle_config(bundle_dir)
    model, tok = load_model(cfg["base_model"], **load_kw)
    attach_bundle(model, bundle_dir)
    model.eval()
    return model, tok


def load_safemoe_run(run_dir: Path, manifest: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """RUN_LOADERS entry: `load_run_model(run_dir)` for runs of kind "safemoe"."""
    if manifest.get("status") not in (None, "complete"):
        raise UserError(f"{run_dir}: the SafeMoE run has not finished (status {manifest.get('status')!r}); "
                        "re-run its recipe to complete it")
    return load_safemoe(run_dir, **kw)


RUN_LOADERS["safemoe"] = load_safemoe_run


# --------------------------------------------------------------------------- inspection


@dataclass
class RoutingInspection:
    """Per-token routing of one prompt and the greedy reply: weights [T, L, E]."""

    prompt: str
    response: str
    token_ids: list[int]
    tokens: list[str]
    response_start: int  # index of the first reply token among `tokens`
    experts: list[str]
    layers: list[str]
    weights: torch.Tensor

    def token_weights(self, layer: int | None = None) -> torch.Tensor:
        """[T, E]: one layer's weights, or the mean over layers."""
        return self.weights.mean(1) if layer is None else self.weights[:, layer]

    def to_dict(self, layer: int | None = None) -> dict[str, Any]:
        w = self.token_weights(layer)
        return {
            "prompt": self.prompt,
            "response": self.response,
            "experts": self.experts,
            "layers": self.layers,
            "layer": "mean" if layer is None else self.layers[layer],
            "response_start": self.response_start,
            "tokens": [{"token": t, "id": i, "weights": [round(float(x), 5) for x in row]}
                       for t, i, row in zip(self.tokens, self.token_ids, w)],
            "mean_weights": {e: round(float(x), 5) for e, x in zip(self.experts, w.mean(0))},
            "mean_response_weights": {e: round(float(x), 5)
                                      for e, x in zip(self.experts, w[self.response_start:].mean(0))}
            if len(w) > self.response_start else {},
        }


def inspect_routing(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 48,
                    system: str | None = None) -> RoutingInspection:
    """Greedy-generate a reply to `prompt` while recording the routing of every token."""
    from tactful.eval.generation import stop_token_ids
    from tactful.models import format_prompt

    moe = get_safemoe(model)
    text = format_prompt(tokenizer, prompt, system=system)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with moe.record() as rec, torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(stop_token_ids(tokenizer, model)),
                             pad_token_id=tokenizer.pad_token_id)
    weights = rec.per_token(0)  # one row per token fed to the model (the last reply token never is)
    ids = out[0].tolist()
    n_prompt = enc["input_ids"].shape[1]
    fed = ids[: weights.shape[0]]
    return RoutingInspection(
        prompt=prompt,
        response=tokenizer.decode(ids[n_prompt:], skip_special_tokens=True),
        token_ids=fed,
        tokens=[tokenizer.decode([t]) for t in fed],
        response_start=n_prompt,
        experts=moe.slot_names,
        layers=list(moe.layers),
        weights=weights,
    )


def plot_routing(insp: RoutingInspection, path: str | os.PathLike, *, layer: int | None = None) -> Path:
    """Heatmap of expert weight per token (experts x tokens), written atomically as PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w = insp.token_weights(layer).T.numpy()  # [E, T]
    T = w.shape[1]
    fig = Figure(figsize=(min(2 + 0.22 * T, 60), 1.4 + 0.45 * len(insp.experts)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    signed = bool((w < 0).any())  # tanh gates: weights in (-1, 1)
    im = ax.imshow(w, aspect="auto", cmap="coolwarm" if signed else "viridis", vmin=-1.0 if signed else 0.0,
                   vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(insp.experts)), labels=insp.experts, fontsize=8)
    ax.set_xticks(range(T), labels=[_printable(t) for t in insp.tokens], rotation=90, fontsize=6)
    ax.axvline(insp.response_start - 0.5, color="white", linewidth=1.5, linestyle="--")
    which = "mean over layers" if layer is None else insp.layers[layer]
    ax.set_title(f"SafeMoE routing ({which}); reply starts after the dashed line", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def _printable(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or "∅"


def inspect(run_dir: str | os.PathLike, prompt: str, *, max_new_tokens: int = 48, system: str | None = None,
            layer: int | None = None, out: str | os.PathLike | None = None, model: Any = None,
            tokenizer: Any = None) -> tuple[RoutingInspection, dict[str, Path]]:
    """Per-token expert weights of a SafeMoE run on one prompt, written as JSON + heatmap PNG.

    out defaults to <run_dir>/inspect/; files are named after a hash of the prompt.
    Returns (inspection, {"json": path, "png": path}).
    """
    if model is None:
        model, tokenizer = load_safemoe(run_dir)
    moe = get_safemoe(model)
    if layer is not None and not -len(moe.layers) <= layer < len(moe.layers):
        raise UserError(f"layer must index the {len(moe.layers)} routed layers, got {layer}")
    insp = inspect_routing(model, tokenizer, prompt, max_new_tokens=max_new_tokens, system=system)
    out_dir = Path(out) if out is not None else Path(run_dir) / "inspect"
    stem = "routing-" + hashlib.sha256(f"{prompt}\0{system}\0{layer}".encode()).hexdigest()[:10]
    paths = {"json": atomic_write_json(out_dir / f"{stem}.json", insp.to_dict(layer)),
             "png": plot_routing(insp, out_dir / f"{stem}.png", layer=layer)}
    return insp, paths


def inspect_command(run: str, prompt: str, *, out: str | None = None, max_new_tokens: int = 48,
                    layer: int | None = None, system: str | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """`tactful safemoe inspect --run DIR --prompt ...`: print the reply and, per token, the
    strongest expert; write the JSON and the heatmap. Returns their paths."""
    insp, paths = inspect(run, prompt, max_new_tokens=max_new_tokens, system=system, layer=layer, out=out)
    w = insp.token_weights(layer)
    log(f"reply: {insp.response}")
    log(f"{'token':>18}  {'top expert':<26} weight")
    for i, (tok, row) in enumerate(zip(insp.tokens, w)):
        if i < insp.response_start - 1:
            continue  # the chat template's tokens: in the JSON and the heatmap, not worth a screen
        j = int(row.argmax())
        log(f"{_printable(tok)[:18]:>18}  {insp.experts[j]:<26} {float(row[j]):.2f}")
    summary = insp.to_dict(layer)["mean_response_weights"]
    if summary:
        log("mean over the reply: " + ", ".join(f"{e} {v:.2f}" for e, v in summary.items()))
    log(f"heatmap: {paths['png']}\njson: {paths['json']}")
    return paths
