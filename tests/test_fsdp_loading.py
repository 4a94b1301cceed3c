"""Big-model loading under FSDP: only the main process reads the weights.

Two CPU processes over gloo are launched by accelerate with the shipped
configs/accelerate/fsdp.yaml (FSDP2, `fsdp_cpu_ram_efficient_loading: true`), set to 2 processes
and no mixed precision. Each process:

- loads a model whose weights are ~100 MB (a wide embedding) with `load_model(for_training=True)`
  and records where its parameters are and how much its peak memory grew meanwhile: the main
  process holds the weights, the other holds every parameter on the meta device and grew by a
  small fraction of them;
- trains sft with LoRA and with full fine-tuning through the Trainer under FSDP (the other
  process's trainable parameters start without values; FSDP broadcasts the main process's when it
  shards), and the saved adapter / model must match a single-process run with the same global
  batch. Without the broadcast they would not; with the trainable parameters left on the meta
  device (accelerate maps the optimizer's parameters by `data_ptr()`, 0 for all of them) the
  other process stops with a KeyError.

accelerate turns FSDP on only for accelerator devices; FSDP2 itself runs on a CPU mesh over gloo,
so the worker lets accelerate use it on the CPU processes (`_fsdp_on_cpu`). Everything else —
the launch environment from the shipped config, tactful's loading, the Trainer's FSDP2 path,
accelerate's sharding and broadcast — is the real code.

This file is also the worker: `accelerate launch ... tests/test_fsdp_loading.py --worker SPEC`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"


def _training(batch: int, *, lr: float) -> dict[str, Any]:
    # Plain SGD and a constant rate: float noise between the runs stays float noise.
    return {"max_steps": 2, "per_device_train_batch_size": batch, "logging_steps": 1, "save_steps": 1000,
            "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "learning_rate": lr, "max_length": 48,
            "optim": "sgd"}


def recipes(base: str, out: Path, per_device: int) -> dict[str, dict[str, Any]]:
    """sft with LoRA and with full fine-tuning; `per_device` x processes is the global batch (4)."""
    return {
        "lora": {"method": "sft", "model": base, "output_dir": str(out / "lora"), "data": {"max_examples": 8},
                 "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                 "training": _training(per_device, lr=1.0)},
        "full": {"method": "sft", "model": base, "output_dir": str(out / "full"), "data": {"max_examples": 8},
                 "lora": {"enabled": False}, "training": _training(per_device, lr=0.05)},
    }


def train(recipe: dict[str, Any], path: Path) -> None:
    from tactful.methods.registry import load_recipe
    from tactful.methods.sft import train_sft

    path.write_text(yaml.safe_dump(recipe))
    _, config = load_recipe(str(path))
    train_sft(config, log=lambda s: None)


def saved(run: Path) -> dict[str, torch.Tensor]:
    """What a run saved: its adapter, or its whole model (full fine-tuning)."""
    from safetensors.torch import load_file

    files = sorted((run / "adapter").glob("*.safetensors"))
    assert files, f"nothing saved in {run}/adapter"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


# ---------------------------------------------------------------- the worker (one per process)


def _fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (it only turns FSDP on for accelerator devices)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self: Any, *args: Any, fsdp_plugin: Any = None, **kw: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # later AcceleratorState() calls copy the type back from here
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp


def _memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _load_report(path: str) -> dict[str, Any]:
    """Where this process's parameters are after `load_model(for_training=True)`, and how much its
    peak memory grew while loading."""
    import gc

    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from tactful.models import checkpoint_dtype, load_model, load_tokenizer, weights_deferred

    # What any first load pays for whatever the weights (the model code's imports, the tokenizer's
    # first parse), outside the measure.
    load_tokenizer(path)
    checkpoint_dtype(path)

    def grown(before: dict[str, int]) -> int:
        after = _memory_kib()
        return (after["VmHWM"] if peak else after["VmRSS"]) - before["VmRSS"]

    # The tokenizer, which load_model loads too, costs the same on every process: measured alone.
    gc.collect()
    peak = _reset_peak()
    before = _memory_kib()
    tokenizer = load_tokenizer(path)
    tokenizer_kib = grown(before)
    del tokenizer
    gc.collect()
    _reset_peak()
    before = _memory_kib()
    model, _ = load_model(path, for_training=True)
    with torch.no_grad():
        # Read every weight that is there: transformers maps the checkpoint file, and pages nobody
        # read yet are not resident. Meta parameters have nothing to read.
        for p in model.parameters():
            if not p.is_meta:
                p.sum()
    report = {"devices": sorted({p.device.type for p in model.parameters()}),
              "deferred": weights_deferred(model),
              "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "grew_kib": grown(before) - tokenizer_kib, "tokenizer_kib": tokenizer_kib, "peak_measured": peak,
              "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}
    del model
    gc.collect()
    return report


def worker(spec_path: str) -> None:
    from tactful import distributed

    torch.set_num_threads(1)
    _fsdp_on_cpu()
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    distributed.setup()
    r, world = distributed.rank(), distributed.world_size()
    assert world == 2, f"expected 2 processes, got {world}"
    assert distributed.ram_efficient_loading()
    report = _load_report(spec["wide"])
    for name, recipe in recipes(spec["base"], out / "runs", spec["global_batch"] // world).items():
        train(recipe, out / f"{name}.{r}.yaml")
    (out / f"load.rank{r}.json").write_text(json.dumps(report))
    distributed.barrier()


# ---------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from tactful.models import tiny_model

    out = {}
    # "wide": ~100 MB of weights, almost all in the (tied) embedding, so what a load costs stands
    # far above the noise of a Python process's memory.
    for name, kw in (("base", {}), ("wide", {"num_layers": 1, "hidden_size": 512, "intermediate_size": 256,
                                            "num_heads": 8, "num_kv_heads": 4})):
        model, tok = tiny_model(seed=0, **kw)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def fsdp_run(model_dirs, tmp_path_factory) -> Path:
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("fsdp")
    # The shipped config, for 2 CPU processes in float32 (no bf16 autocast on these CPUs' test).
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    config.update(num_processes=2, mixed_precision="no")
    (out / "fsdp.yaml").write_text(yaml.safe_dump(config))
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "base": model_dirs["base"], "wide": model_dirs["wide"],
                                "global_batch": 4}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "fsdp.yaml"),
           "--main_process_port", str(_free_port()), __file__, "--worker", str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single_process_runs(model_dirs, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("single")
    runs = {}
    for name, recipe in recipes(model_dirs["base"], out / "runs", per_device=4).items():
        train(recipe, out / f"{name}.yaml")
        runs[name] = saved(Path(recipe["output_dir"]))
    return runs


def test_only_the_main_process_materialises_the_weights(fsdp_run):
    main = json.loads((fsdp_run / "load.rank0.json").read_text())
    other = json.loads((fsdp_run / "load.rank1.json").read_text())
    assert main["devices"] == ["cpu"] and not main["deferred"]
    assert other["devices"] == ["meta"] and other["deferred"]  # every parameter, before any sharding
    assert main["tied"] and other["tied"]  # the same parameter list as the main process's
    size_kib = main["weight_bytes"] / 1024
    assert size_kib > 90_000
    # Beyond its tokenizer, the main process's (peak) memory grows by the weights; the other's by
    # a few percent of them (the model's structure).
    assert main["grew_kib"] > 0.9 * size_kib, main
    assert other["grew_kib"] < 0.05 * size_kib, other


@pytest.mark.parametrize("name", ["lora", "full"])
def test_fsdp_training_from_the_main_process_weights_matches_one_process(fsdp_run, single_process_runs, name):
    """FSDP filled the other process's empty model from the main process's and both trained it:
    the result is the single-process one with the same global batch."""
    two, one = saved(fsdp_run / "runs" / name), single_process_runs[name]
    if "lm_head.weight" in two and "lm_head.weight" not in one:
        # FSDP's full state dict gathers the tied output head as a tensor of its own; a tied model
        # saved by one process stores the shared matrix once.
        assert torch.equal(two.pop("lm_head.weight"), two["model.embed_tokens.weight"])
    assert two.keys() == one.keys()
    moved = False
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-6), (k, float((two[k] - one[k]).abs().max()))
        moved |= "lora_B" in k and bool(one[k].abs().max() > 0)
    if name == "lora":
        assert moved  # something really trained


def test_loading_without_fsdp_is_unchanged(model_dirs, monkeypatch):
    """A single process, or FSDP without RAM-efficient loading: every process loads the weights."""
    from tactful import distributed
    from tactful.models import load_model, weights_deferred

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert not distributed.ram_efficient_loading()  # one process: nothing to broadcast from
    model, _ = load_model(model_dirs["base"], for_training=True)
    assert not weights_deferred(model) and {p.device.type for p in model.parameters()} == {"cpu"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.ram_efficient_loading() and not distributed.is_main_process()
    model, _ = load_model(model_dirs["base"])  # not for training: a whole model, whatever the launch
    assert not weights_deferred(model)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    assert not distributed.ram_efficient_loading()


def test_training_dtype_defaults(monkeypatch):
    """Unset: float32 on CPU (as before); on a GPU the checkpoint's, except full fine-tuning where
    nothing keeps float32 master weights."""
    from tactful.errors import UserError
    from tactful.models import training_dtype

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    assert training_dtype("bfloat16") == "bfloat16"
    with pytest.raises(UserError, match="unknown dtype"):
        training_dtype("bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_dtype(None) == training_dtype(None, full_finetune=True) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_dtype(None) == "auto"
    assert training_dtype(None, full_finetune=True) == "float32"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # FSDP upcasts what trains
    assert training_dtype(None, full_finetune=True) == "auto"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert training_dtype(None, full_finetune=True) == "float32"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # DeepSpeed keeps its own fp32 copy
    assert training_dtype(None, full_finetune=True) == "auto"


def test_checkpoint_dtype_and_loading_in_it(tmp_path):
    from tactful.models import checkpoint_dtype, load_model, tiny_model

    model, tok = tiny_model(seed=0, num_layers=1)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert checkpoint_dtype(str(tmp_path)) == torch.bfloat16
    loaded, _ = load_model(str(tmp_path), dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(str(tmp_path)) == torch.bfloat16  # from the safetensors header


def test_materialize_trainable_gives_storage_to_what_trains_only(model_dirs):
    from tactful.methods.common import LoraSettings, prepare_trainable
    from tactful.models import _empty_model, materialize_trainable

    model = _empty_model("base", model_dirs["base"], torch.float32, trust_remote_code=False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    peft = prepare_trainable(model, LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    trained = [p for p in peft.parameters() if p.requires_grad]
    assert trained and all(p.device.type == "cpu" for p in trained)
    assert len({p.data_ptr() for p in trained}) == len(trained)  # what accelerate maps the optimizer by
    assert all(p.is_meta for p in peft.parameters() if not p.requires_grad)
    full = _empty_model("base", model_dirs["base"], torch.float32, trust_remote_code=False)
    materialize_trainable(full)
    assert not any(p.is_meta for p in full.parameters())
    assert full.get_output_embeddings().weight is full.get_input_embeddings().weight  # still tied


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit("usage: accelerate launch ... tests/test_fsdp_loading.py --worker SPEC.json")
