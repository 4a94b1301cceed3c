"""SAE training speed: tactful's TopK SAE trainer against SAELens's, on the same cached activations.

    python benchmarks/bench_sae.py --threads 1      # ~4 minutes on 2 busy cores

1. Capture once: the o_proj input of one layer of the embedded model (SmolLM2-135M-Instruct,
   float32) over tactful's default SAE corpus, `--tokens` training tokens plus
   `--eval-tokens` held out, saved to one safetensors file (the cached activations).
2. Train a TopK SAE on that file with each library, each in its own fresh process (so that
   peak memory is each trainer's own): same d_in, d_sae (`--expansion` x d_in), k, batch
   size, steps, Adam learning rate, linear decay over the last 20 % of steps, AuxK weight
   1/32 and dead window; both rescale inputs to E||x||^2 = d_in and fold the scale back.
   - tactful: `tactful.methods.refusal_guard.sae.train_sae` (its shuffle buffer included);
   - SAELens: `TopKTrainingSAE` + `SAETrainer.fit` fed shuffled batches of the same tensor
     (its defaults otherwise: decoder-norm rescaling of activations, gradient clipping).
3. Report training tokens/s, peak RSS, the RSS growth during training, and explained
   variance / L0 on the held-out tokens (a speed ratio means nothing if one side does not learn).

The roofline: a TopK SAE training step costs about 6 x d_in x d_sae x 2 FLOPs per token
(encoder and decoder matmuls, forward and backward, dense as both libraries compute them);
divided into the measured float32 matmul rate it gives the tokens/s ceiling.

If SAELens is not installed (or cannot be imported) the script still trains ours and
records why SAELens is absent. Writes benchmarks/results/sae.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)

SIDES = ("tactful", "saelens")


# ---------------------------------------------------------------- memory

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS since exec. (ru_maxrss is no use here: Linux carries the
    parent's peak across fork + exec, and the parent holds the model that captured the data.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples this process's RSS every few ms: the peak during a block, not since start."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


# ---------------------------------------------------------------- workers (one per side, own process)

def _batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of the training tokens (a fresh permutation per pass)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[i:i + batch_size]]


@torch.no_grad()
def _quality(encode: Any, decode: Any, x: torch.Tensor) -> dict[str, float]:
    acts = encode(x)
    x_hat = decode(acts)
    sse = (x - x_hat).pow(2).sum().item()
    tot = (x - x.mean(0)).pow(2).sum().item()
    return {"explained_variance": round(1 - sse / tot, 4), "l0": round((acts > 0).float().sum(-1).mean().item(), 2)}


def train_tactful(train: torch.Tensor, held: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    from tactful.methods.refusal_guard.sae import SAEConfig, SAETrainSettings, SparseAutoencoder, train_sae

    d_in = train.shape[1]
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=a.expansion * d_in, architecture="topk", k=a.k), seed=a.seed)
    settings = SAETrainSettings(steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                                dead_window_tokens=a.dead_window_tokens, eval_tokens=256, seed=a.seed)
    chunk = 8192

    def source() -> Iterator[torch.Tensor]:
        return (train[i:i + chunk] for i in range(0, len(train), chunk))

    t = time.perf_counter()
    with PeakRSS() as mem:
        train_sae(sae, source, settings, log=lambda s: None)
    seconds = time.perf_counter() - t
    sae.eval()
    return {"seconds": seconds, "tokens": a.steps * a.batch_size, "rss_before_mb": mem.start, "rss_peak_mb": mem.peak,
            **_quality(sae.encode, sae.decode, held)}


def train_saelens(train: torch.Tensor, held: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    import sae_lens
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    d_in = train.shape[1]
    torch.manual_seed(a.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=a.expansion * d_in, k=a.k, aux_loss_coefficient=1 / 32,
                                                normalize_activations="expected_average_only_in", dtype="float32",
                                                device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch_size, train_batch_size_samples=a.batch_size,
                           lr=a.lr, lr_end=a.lr, lr_decay_steps=int(0.2 * a.steps), device="cpu",
                           dead_feature_window=max(1, a.dead_window_tokens // a.batch_size),
                           feature_sampling_window=a.steps, n_batches_for_norm_estimate=32,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, data_provider=_batches(train, a.batch_size, a.seed))
    t = time.perf_counter()
    with PeakRSS() as mem:
        trainer.fit()
    seconds = time.perf_counter() - t
    sae.eval()
    return {"seconds": seconds, "tokens": a.steps * a.batch_size, "rss_before_mb": mem.start, "rss_peak_mb": mem.peak,
            "version": sae_lens.__version__, **_quality(sae.encode, sae.decode, held)}


def worker(a: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    torch.set_num_threads(a.threads or torch.get_num_threads())
    data = load_file(a.acts)
    train, held = data["train"], data["held_out"]
    res = (train_tactful if a.worker == "tactful" else train_saelens)(train, held, a)
    res["peak_rss_process_mb"] = _peak_rss_mb()
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------- driver

def saelens_absent_reason() -> str | None:
    """Why SAELens cannot run here, or None when it can."""
    try:
        import sae_lens  # noqa: F401
        from sae_lens import SAETrainer, TopKTrainingSAE  # noqa: F401
    except Exception as e:  # an install that imports badly is as absent as no install
        return f"sae-lens does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def capture(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import save_file

    from tactful.methods.refusal_guard.capture import attention_sites, decoder_layer_list, stream_activations
    from tactful.methods.refusal_guard.train import DEFAULT_SAE_SOURCES, corpus_texts, default_layers
    from tactful.models import load_model

    model, tok = load_model("embedded")
    layer = a.layer if a.layer is not None else default_layers(len(decoder_layer_list(model)[1]))[1]
    texts = corpus_texts(tok, list(DEFAULT_SAE_SOURCES), "train", seed=a.seed)
    t = time.perf_counter()
    chunks = [c[layer] for c in stream_activations(model, tok, texts, layers=[layer], max_tokens=a.tokens + a.eval_tokens)]
    seconds = time.perf_counter() - t
    acts = torch.cat(chunks)
    if len(acts) < a.tokens + a.eval_tokens:
        raise SystemExit(f"the corpus gave only {len(acts)} tokens; lower --tokens")
    # held-out tokens from the end of the stream: texts the training tokens never came from
    save_file({"train": acts[: a.tokens].contiguous(), "held_out": acts[a.tokens:].contiguous()}, str(path))
    site = attention_sites(model, [layer])[0]
    return {"layer": layer, "module": site.out_name, "d_in": acts.shape[1], "tokens": a.tokens,
            "held_out_tokens": a.eval_tokens, "capture_seconds": round(seconds, 1)}


def matmul_gflops(n: int = 2048, reps: int = 5, trials: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_side(side: str, acts: Path, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", side, "--acts", str(acts), "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--expansion", str(a.expansion), "--k", str(a.k), "--lr", str(a.lr),
           "--dead-window-tokens", str(a.dead_window_tokens), "--seed", str(a.seed)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"{side} worker failed (exit {proc.returncode}): {tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32_768, help="training tokens captured")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for quality")
    ap.add_argument("--layer", type=int, default=None, help="layer (default: the middle default SAE layer)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dead-window-tokens", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sae.json"))
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--acts", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    absent = saelens_absent_reason()

    with tempfile.TemporaryDirectory(prefix="bench-sae-") as tmp:
        acts = Path(tmp) / "activations.safetensors"
        data = capture(acts, a)
        print(f"captured {data['tokens']} + {data['held_out_tokens']} tokens of layer {data['layer']} "
              f"({data['module']} input, d_in {data['d_in']}) in {data['capture_seconds']} s", flush=True)
        results: dict[str, Any] = {}
        for side in SIDES:
            if side == "saelens" and absent:
                print(f"saelens: skipped ({absent})")
                continue
            r = run_side(side, acts, a)
            r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
            results[side] = r
            print(f"{side:<8} {r['seconds']:6.1f} s {r['tokens_per_s']:8.0f} tokens/s  peak RSS "
                  f"{r['peak_rss_process_mb']:.0f} MB (+{r['rss_peak_mb'] - r['rss_before_mb']:.0f} MB training)  "
                  f"explained variance {r['explained_variance']:.3f}  L0 {r['l0']:.1f}", flush=True)

    gflops = matmul_gflops()
    d_in = data["d_in"]
    flops_per_token = 6 * 2 * d_in * a.expansion * d_in
    roofline = gflops * 1e9 / flops_per_token
    for r in results.values():
        r["roofline_fraction"] = round(r["tokens_per_s"] / roofline, 3)
    summary: dict[str, Any] = {}
    if "saelens" in results:
        ours, theirs = results["tactful"], results["saelens"]
        summary = {
            "tactful_vs_saelens_tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
            "tactful_vs_saelens_peak_rss": round(ours["peak_rss_process_mb"] / theirs["peak_rss_process_mb"], 2),
            "tactful_vs_saelens_training_rss_growth": round(
                max(ours["rss_peak_mb"] - ours["rss_before_mb"], 1.0)
                / max(theirs["rss_peak_mb"] - theirs["rss_before_mb"], 1.0), 2),
        }
        print("\n" + ", ".join(f"{k} {v}" for k, v in summary.items()))
    print(f"roofline {roofline:.0f} tokens/s ({gflops:.0f} GFLOP/s float32 matmul, {flops_per_token / 1e6:.1f} "
          "MFLOP per token)")
    result = {
        "benchmark": "sae",
        "command": " ".join(["python", "benchmarks/bench_sae.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)",
        "activations": data,
        "settings": {"architecture": "topk", "d_in": d_in, "d_sae": a.expansion * d_in, "k": a.k,
                     "batch_size": a.batch_size, "steps": a.steps, "lr": a.lr, "lr_decay": "linear, last 20 %",
                     "aux_k_coefficient": 1 / 32, "dead_window_tokens": a.dead_window_tokens},
        "saelens_absent": absent,
        "machine": machine_info(load_before),
        "matmul_gflops": round(gflops, 1),
        "roofline_tokens_per_s": round(roofline, 1),
        "results": results,
        "summary": summary,
    }
    from tactful.io import atomic_write_json

    atomic_write_json(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
