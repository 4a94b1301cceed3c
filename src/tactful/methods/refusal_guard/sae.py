"""Sparse autoencoders on attention activations, saved in SAELens's on-disk layout.

Two trainable variants:

    topk      acts = TopK_k(ReLU((x - b_dec) W_enc + b_enc))         (Gao et al. 2024)
    standard  acts = ReLU((x - b_dec) W_enc + b_enc), loss + l1 * sum(acts)
    x_hat = acts W_dec + b_dec

Decoder rows (one per latent, shape [d_sae, d_in] as in SAELens) are kept at unit norm:
the gradient component parallel to each row is removed before the step and the rows are
renormalised after it, so the L1 penalty cannot be dodged by shrinking activations and
growing decoder rows. Latents that have not fired for `dead_window_tokens` tokens are
counted as dead; for TopK an auxiliary loss (AuxK) lets them reconstruct the residual.

Inputs are scaled by one constant so that E||x||^2 = d_in during training (hyper-
parameters then transfer across models); the constant is folded into b_enc and b_dec on
save, so the files work on raw activations with `normalize_activations: "none"`.

On disk (what `SAE.load_from_disk` in SAELens reads): `cfg.json` + `sae_weights.safetensors`
with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; plus
`sparsity.safetensors` (log10 firing frequency). JumpReLU SAEs from SAELens load for
inference (encode / decode / decoder directions) but are not trained here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from tactful.architectures import attn_out_leaf_names
from tactful.errors import UserError

ARCHITECTURES = ("topk", "standard")
LOADABLE = ("topk", "standard", "jumprelu")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"


@dataclass
class SAEConfig:
    """What defines one SAE: sizes, sparsity and where its inputs come from."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32  # topk only
    hook_name: str = ""  # TransformerLens name, e.g. "blocks.12.attn.hook_z" (= the o_proj input)
    hook_layer: int | None = None
    model_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    hf_module: str | None = None  # the transformers module whose *input* is captured
    extra: dict[str, Any] = field(default_factory=dict)  # metrics, training settings (cfg.json "tactful")

    def __post_init__(self) -> None:
        if self.architecture not in LOADABLE:
            raise UserError(f"unknown SAE architecture {self.architecture!r}; supported: {', '.join(LOADABLE)}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise UserError(f"TopK SAE needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")


class SparseAutoencoder(torch.nn.Module):
    """A TopK or ReLU SAE with SAELens's parameter names and shapes."""

    def __init__(self, cfg: SAEConfig, *, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # Unit-norm decoder rows; encoder initialised as the decoder's transpose (tied init),
        # which starts every latent as a matched filter for its own direction.
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = torch.nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=False)

    # ------------------------------------------------------------ forward
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            top = torch.topk(pre, self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        if self.cfg.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return F.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def decoder_directions(self, latents: Iterable[int]) -> torch.Tensor:
        """Unit decoder directions of the given latents as columns: [d_in, n]."""
        idx = torch.as_tensor(list(latents), dtype=torch.long)
        d = self.W_dec.detach()[idx].float()
        return (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).T

    # ------------------------------------------------------------ unit-norm decoder
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (the step then moves along the sphere)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, *, sparsity: torch.Tensor | None = None) -> Path:
        """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors) atomically."""
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
            if self.cfg.architecture == "jumprelu":
                tensors["threshold"] = self.threshold
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
            if sparsity is not None:
                save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(tmp / SPARSITY_FILE))
            (tmp / CFG_FILE).write_text(json.dumps(saelens_cfg(self.cfg), indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseAutoencoder":
        return load_sae(path)


def saelens_cfg(cfg: SAEConfig) -> dict[str, Any]:
    """cfg.json in SAELens's flat (pre-6.0) layout, which SAELens 6 still reads: no
    `sae_lens_version`, so its loader upgrades the flat fields (hook_name, model_name,
    activation_fn, activation_fn_kwargs.k) itself."""
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer,
        "hook_head_index": None,
        "activation_fn": "topk" if cfg.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.architecture == "topk" else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        # hook_z activations arrive from TransformerLens as [..., n_heads, d_head]; SAELens
        # flattens them. tactful always feeds the flat o_proj input.
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        "prepend_bos": False,
        "hf_hook_module": cfg.hf_module,
        "hf_hook_side": "input",
        "tactful": cfg.extra,
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
    return out


_LAYER_IN_HOOK = re.compile(r"blocks\.(\d+)\.")
_LAYER_IN_MODULE = re.compile(r"layers?\.(\d+)\.|\.h\.(\d+)\.")


def load_sae(path: str | os.PathLike) -> SparseAutoencoder:
    """Load an SAE saved by tactful or SAELens (flat pre-6.0 or nested 6.x cfg.json)."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg_path, w_path = d / CFG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{path}: not an SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg})", where=f"{cfg_path}:{e.lineno}") from None
    meta = {**(raw.get("metadata") or {}), **(raw.get("meta") or {})}  # SAELens 6 nests these

    def get(name: str, default: Any = None) -> Any:
        return raw[name] if raw.get(name) is not None else meta.get(name, default)

    arch = raw.get("architecture") or "standard"
    act_fn = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    if arch == "standard" and act_fn == "topk":  # older SAELens TopK files
        arch = "topk"
    if arch not in LOADABLE:
        raise UserError(f"{cfg_path}: SAE architecture {arch!r} is not supported; supported: {', '.join(LOADABLE)}")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k") or 0
    if raw.get("normalize_activations") not in (None, "none", False):
        # Decoder *directions* (all the guard uses) do not depend on a constant input scale,
        # but encoder activations do: warn rather than silently mis-scale feature scores.
        import warnings

        warnings.warn(f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} is not applied; "
                      "decoder directions are unaffected, feature scores are in the SAE's scaled units")
    hook_name = get("hook_name") or get("hook_point") or ""
    layer = get("hook_layer")
    if layer is None:
        m = _LAYER_IN_HOOK.search(hook_name) or _LAYER_IN_MODULE.search(raw.get("hf_hook_module") or "")
        layer = int(next(g for g in m.groups() if g is not None)) if m else None
    try:
        cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=arch, k=int(k or 1),
                        hook_name=hook_name, hook_layer=layer, model_name=get("model_name") or "",
                        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                        hf_module=raw.get("hf_hook_module"), extra=raw.get("tactful") or {})
    except KeyError as e:
        raise UserError(f"{cfg_path}: missing field {e.args[0]!r}") from None
    sae = SparseAutoencoder(cfg)
    state = load_file(str(w_path))
    if "scaling_factor" in state and not torch.allclose(state["scaling_factor"], torch.ones_like(state["scaling_factor"])):
        raise UserError(f"{w_path}: SAEs with a finetuning scaling factor are not supported")
    state.pop("scaling_factor", None)
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if arch == "jumprelu":
        want["threshold"] = (cfg.d_sae,)
    for name, shape in want.items():
        if name not in state:
            raise UserError(f"{w_path}: missing tensor {name!r} (has {', '.join(sorted(state))})")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{w_path}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(state[name].float())
    return sae


def load_sae_dir(path: str | os.PathLike) -> dict[int, SparseAutoencoder]:
    """{layer: SAE} from one SAE directory or a directory of them (e.g. layer_12/, blocks.12.attn.hook_z/)."""
    d = Path(path)
    if (d / CFG_FILE).is_file():
        candidates = [d]
    else:
        candidates = sorted(p for p in d.iterdir() if (p / CFG_FILE).is_file()) if d.is_dir() else []
    if not candidates:
        raise UserError(f"{path}: no SAE found (a directory with {CFG_FILE} + {WEIGHTS_FILE}, or subdirectories of them)")
    out: dict[int, SparseAutoencoder] = {}
    for c in candidates:
        sae = load_sae(c)
        if sae.cfg.hook_layer is None:
            raise UserError(f"{c}/{CFG_FILE}: cannot tell which layer this SAE belongs to (no hook_layer, and "
                            f"hook_name {sae.cfg.hook_name!r} names no block)")
        check_attention_hook(sae.cfg, where=str(c / CFG_FILE))
        if sae.cfg.hook_layer in out:
            raise UserError(f"{path}: two SAEs for layer {sae.cfg.hook_layer}")
        out[sae.cfg.hook_layer] = sae
    return out


def check_attention_hook(cfg: SAEConfig, *, where: str) -> None:
    """The guard needs SAEs on the o_proj input (hook_z). A residual-stream SAE often has the
    same width (n_heads * head_dim == hidden size), so the shape check alone would pass."""
    name = cfg.hook_name or ""
    if name.endswith("hook_z") or (cfg.hf_module or "").rsplit(".", 1)[-1] in attn_out_leaf_names():
        return
    raise UserError(f"SAE hook {name!r} is not the attention output before o_proj (TransformerLens hook_z); "
                    "refusal_guard needs SAEs trained on that activation", where=where)


# ---------------------------------------------------------------- training

@dataclass
class SAETrainSettings:
    steps: int = 2000
    batch_size: int = 512  # tokens per optimizer step
    learning_rate: float = 5e-4
    l1_coefficient: float = 2.0  # standard (ReLU) SAEs only
    aux_k_coefficient: float = 1 / 32  # topk only: AuxK weight (Gao et al.)
    dead_window_tokens: int = 50_000  # a latent silent this long counts as dead
    buffer_tokens: int = 16_384  # shuffle buffer: consecutive tokens of one text are correlated
    eval_tokens: int = 2048  # held out from the first chunks for the final metrics
    decay_fraction: float = 0.2  # linear LR decay to 0 over the last fraction of steps
    seed: int = 0


@dataclass
class SAEMetrics:
    mse: float  # mean squared error per element, raw activation units
    explained_variance: float  # 1 - SSE / total sum of squares around the mean
    l0: float  # mean active latents per token
    dead_fraction: float  # latents not fired within the dead window
    steps: int
    tokens: int  # tokens trained on (counting repeats)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class SAETrainer:
    """Trains one SAE from chunks of activations pushed with `feed` (streaming: only a
    shuffle buffer of `buffer_tokens` rows is held)."""

    def __init__(self, sae: SparseAutoencoder, settings: SAETrainSettings):
        if sae.cfg.architecture not in ARCHITECTURES:
            raise UserError(f"cannot train a {sae.cfg.architecture!r} SAE; trainable: {', '.join(ARCHITECTURES)}")
        self.sae = sae
        self.s = settings
        self.device = sae.W_dec.device  # chunks arrive on the CPU; training runs where the SAE lives
        self.opt = torch.optim.Adam(sae.parameters(), lr=settings.learning_rate, betas=(0.9, 0.999))
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.scale: float | None = None  # x -> x * scale makes E||x||^2 = d_in
        self.buffer: list[torch.Tensor] = []
        self.eval_rows: list[torch.Tensor] = []
        self.pass_rows = 0  # rows seen in the current pass (the first eval_tokens are never trained on)
        self.step = 0
        self.tokens = 0
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.fire_count = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.history: list[dict[str, float]] = []

    @property
    def done(self) -> bool:
        return self.step >= self.s.steps

    def feed(self, acts: torch.Tensor) -> None:
        """Add a chunk [n, d_in]; train whenever the shuffle buffer is full."""
        acts = acts.to(self.device, torch.float32)
        if self.pass_rows < self.s.eval_tokens:
            # The first rows of the (deterministic) stream are the held-out evaluation set:
            # kept on the first pass, skipped on every pass.
            take = self.s.eval_tokens - self.pass_rows
            if not self.step and sum(len(t) for t in self.eval_rows) < self.s.eval_tokens:
                self.eval_rows.append(acts[:take])
            self.pass_rows += min(take, len(acts))
            acts = acts[take:]
        else:
            self.pass_rows += len(acts)
        if len(acts):
            self.buffer.append(acts)
        if sum(len(t) for t in self.buffer) >= self.s.buffer_tokens:
            self._drain(keep_half=True)

    def flush(self) -> None:
        """End of a pass over the data: train on what is left in the buffer."""
        self._drain(keep_half=False)
        self.pass_rows = 0

    def _drain(self, *, keep_half: bool) -> None:
        if not self.buffer or self.done:
            return
        data = torch.cat(self.buffer)
        if self.scale is None:
            self._init_from(data)
        data = data[torch.randperm(len(data), generator=self.gen).to(data.device)]
        n_use = len(data) // 2 if keep_half else len(data)
        bs = self.s.batch_size
        # Full batches only while streaming; a short tail stays for the next chunk.
        n_batches = n_use // bs if keep_half else math.ceil(n_use / bs)
        for i in range(n_batches):
            if self.done:
                break
            self._train_step(data[i * bs:(i + 1) * bs])
        used = min(n_batches * bs, len(data))
        self.buffer = [data[used:]] if used < len(data) else []

    @torch.no_grad()
    def _init_from(self, data: torch.Tensor) -> None:
        mean_sq = data.pow(2).sum(-1).mean().item()
        self.scale = math.sqrt(self.sae.cfg.d_in / max(mean_sq, 1e-12))
        # b_dec starts at the data mean so latents model deviations from it.
        self.sae.b_dec.copy_(data.mean(0) * self.scale)

    def _lr(self) -> float:
        decay_start = int(self.s.steps * (1 - self.s.decay_fraction))
        if self.step < decay_start:
            return self.s.learning_rate
        return self.s.learning_rate * max(0.0, (self.s.steps - self.step) / max(1, self.s.steps - decay_start))

    def _train_step(self, x: torch.Tensor) -> None:
        sae, cfg = self.sae, self.sae.cfg
        x = x * self.scale
        pre = sae.pre_acts(x)
        acts = sae.activate(pre)
        x_hat = sae.decode(acts)
        resid = x - x_hat
        mse = resid.pow(2).sum(-1).mean()
        loss = mse
        if cfg.architecture == "standard":
            loss = loss + self.s.l1_coefficient * acts.sum(-1).mean()  # |acts| = acts after ReLU
        dead = self.since_fired >= self.s.dead_window_tokens
        if cfg.architecture == "topk" and self.s.aux_k_coefficient > 0 and dead.any():
            loss = loss + self.s.aux_k_coefficient * self._aux_k_loss(pre, resid.detach(), dead)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = (acts > 0).any(0)
            self.fire_count += (acts > 0).sum(0)
            self.since_fired += len(x)
            self.since_fired[fired] = 0
        self.step += 1
        self.tokens += len(x)
        if self.step % 50 == 0 or self.step == 1 or self.done:
            tot = (x - x.mean(0)).pow(2).sum()
            self.history.append({"step": self.step, "loss": loss.item(), "mse": mse.item() / cfg.d_in,
                                 "explained_variance": 1 - resid.pow(2).sum().item() / max(tot.item(), 1e-12),
                                 "l0": (acts > 0).float().sum(-1).mean().item(),
                                 "dead_fraction": dead.float().mean().item()})

    def _aux_k_loss(self, pre: torch.Tensor, resid: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """Dead latents (top k_aux of them per token) try to reconstruct the live latents' residual."""
        k_aux = min(int(dead.sum()), self.sae.cfg.d_in // 2)
        masked = pre.masked_fill(~dead, float("-inf"))
        top = masked.topk(k_aux, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        aux_recon = aux_acts @ self.sae.W_dec  # no bias: it models the residual only
        scale = min(int(dead.sum()) / k_aux, 1.0)
        return scale * (aux_recon - resid).pow(2).sum(-1).mean()

    @torch.no_grad()
    def finish(self) -> SAEMetrics:
        """Fold the input scale into the biases (files then take raw activations) and evaluate."""
        if self.scale is None:
            raise UserError("the SAE saw no activations: check the capture data and token budget")
        sae = self.sae
        # acts(x)/s = TopK/ReLU((x - b_dec/s) W_enc + b_enc/s): ReLU and TopK commute with s > 0,
        # so dividing both biases by s gives the same latents (in raw units) and unit decoder rows.
        sae.b_enc /= self.scale
        sae.b_dec /= self.scale
        self.scale = 1.0
        ev = torch.cat(self.eval_rows) if self.eval_rows else torch.cat(self.buffer)[: self.s.eval_tokens]
        metrics = evaluate_sae(sae, ev)
        window = min(self.s.dead_window_tokens, self.tokens)
        dead = (self.since_fired >= window).float().mean().item()
        return SAEMetrics(mse=metrics["mse"], explained_variance=metrics["explained_variance"], l0=metrics["l0"],
                          dead_fraction=dead, steps=self.step, tokens=self.tokens)

    def log_sparsity(self) -> torch.Tensor:
        """log10 firing frequency per latent (SAELens's sparsity.safetensors)."""
        return torch.log10(self.fire_count.float().cpu() / max(self.tokens, 1) + 1e-10)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    x = x.to(sae.W_dec.device, torch.float32)
    acts = sae.encode(x)
    x_hat = sae.decode(acts)
    sse = (x - x_hat).pow(2).sum().item()
    tot = (x - x.mean(0)).pow(2).sum().item()
    return {"mse": sse / x.numel(), "explained_variance": 1 - sse / max(tot, 1e-12),
            "l0": (acts > 0).float().sum(-1).mean().item()}


def train_saes(
    saes: Mapping[int, SparseAutoencoder],
    source: Callable[[], Iterator[Mapping[int, torch.Tensor]]],
    settings: SAETrainSettings,
    *,
    log: Callable[[str], None] = print,
    max_passes: int = 1000,
) -> dict[int, SAETrainer]:
    """Train one SAE per key (layer) from a re-startable stream of {layer: activations} chunks.

    Every pass over the stream feeds all SAEs, so one model forward pass serves every
    layer; the stream is restarted until every SAE has taken `settings.steps` steps.
    """
    trainers = {k: SAETrainer(sae, settings) for k, sae in saes.items()}
    passes = 0
    while not all(t.done for t in trainers.values()):
        if passes >= max_passes:
            break
        n, before = 0, sum(t.step for t in trainers.values())
        for chunk in source():
            for k, t in trainers.items():
                if k in chunk and not t.done:
                    t.feed(chunk[k])
            n += 1
            if all(t.done for t in trainers.values()):
                break
        for t in trainers.values():
            t.flush()
        passes += 1
        if n == 0:
            raise UserError("the activation stream is empty: no tokens to train the SAE on")
        if sum(t.step for t in trainers.values()) == before:
            raise UserError(f"too few activation tokens to train on: the first {settings.eval_tokens} are held out "
                            "for evaluation; capture more tokens or lower eval_tokens")
        progress = ", ".join(f"layer {k}: step {t.step}/{settings.steps}" for k, t in trainers.items())
        log(f"SAE pass {passes}: {progress}")
    return trainers


def train_sae(sae: SparseAutoencoder, source: Callable[[], Iterator[torch.Tensor]], settings: SAETrainSettings,
              *, log: Callable[[str], None] = print) -> tuple[SparseAutoencoder, SAEMetrics]:
    """Train a single SAE on a re-startable stream of activation tensors."""
    trainer = train_saes({0: sae}, lambda: ({0: t} for t in source()), settings, log=log)[0]
    return sae, trainer.finish()
