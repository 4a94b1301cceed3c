"""Choosing what vLLM runs, without vLLM: a stand-in `vllm` module records what tactful asks of it.

Covers plain models, LoRA adapters (one LoRARequest per generate call), training runs (base model
+ adapter, full fine-tunes), the runs vLLM cannot run (SafeMoE bundles, stacked adapters: hf
fallback with one message), engine options, and a missing or broken vLLM install.
"""

from __future__ import annotations

import builtins
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tactful.errors import UserError
from tactful.eval.generation import GenerationConfig, HFGenerator, VLLMGenerator, make_generator, plan_vllm_run


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class SamplingParams:
    def __init__(self, **kw: Any):
        self.kw = kw


class FakeLLM:
    instances: list["FakeLLM"] = []

    def __init__(self, **kw: Any):
        from tactful.models import load_tokenizer

        self.kw = kw
        self.calls: list[tuple[Any, ...]] = []
        self._tok = load_tokenizer("embedded")
        FakeLLM.instances.append(self)

    def get_tokenizer(self) -> Any:
        return self._tok

    def generate(self, prompts: list[dict], params: SamplingParams, lora_request: Any = None,
                 use_tqdm: bool = False) -> list[Any]:
        self.calls.append((prompts, params, lora_request))
        out = types.SimpleNamespace
        return [out(outputs=[out(text=f"reply {len(p['prompt_token_ids'])}")]) for p in prompts]


@pytest.fixture()
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeLLM.instances = []
    return FakeLLM


def _adapter(path: Path, r: int = 8) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}))
    return path


def _run(path: Path, **manifest: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")  # every run has its resolved config next to the manifest
    (path / "manifest.json").write_text(json.dumps({"status": "complete", **manifest}))
    return path


def test_plain_model(fake_vllm, tmp_path):
    gen = make_generator("vllm", model_spec=str(tmp_path), dtype="bfloat16", api_key_env="ignored")
    assert isinstance(gen, VLLMGenerator) and gen.name == f"vllm:{tmp_path}"
    (llm,) = fake_vllm.instances
    assert llm.kw == {"model": str(tmp_path), "dtype": "bfloat16", "gpu_memory_utilization": 0.85}
    assert gen.generate(["hi", "a longer prompt"], GenerationConfig(max_new_tokens=5))[0].startswith("reply ")
    prompts, params, lora = llm.calls[0]
    assert lora is None and params.kw["max_tokens"] == 5 and params.kw["temperature"] == 0.0
    assert all("prompt_token_ids" in p for p in prompts)  # chat-templated token ids, no second BOS


def test_lora_adapter_goes_in_every_request(fake_vllm, tmp_path):
    adir = _adapter(tmp_path / "my-adapter", r=24)
    gen = make_generator("vllm", model_spec="embedded", adapter=str(adir))
    (llm,) = fake_vllm.instances
    assert llm.kw["enable_lora"] is True and llm.kw["max_lora_rank"] == 32 and llm.kw["max_loras"] == 1
    gen.generate(["x"] * 3, GenerationConfig(max_new_tokens=4, batch_size=2))
    assert [c[2] for c in llm.calls] == [LoRARequest("my-adapter", 1, str(adir.resolve()))]


def test_engine_options_reach_vllm_and_win(fake_vllm, tmp_path):
    make_generator("vllm", model_spec=str(tmp_path),
                   engine_options={"tensor_parallel_size": 4, "max_model_len": 4096, "gpu_memory_utilization": 0.9})
    kw = fake_vllm.instances[0].kw
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["gpu_memory_utilization"]) == (4, 4096, 0.9)
    with pytest.raises(UserError, match="'model'"):
        make_generator("vllm", model_spec=str(tmp_path), engine_options={"model": "other"})


def test_training_runs_become_base_model_plus_adapter(fake_vllm, tmp_path):
    sft = _run(tmp_path / "sft", kind="sft", base_model="org/base-7b", adapter="adapter")
    _adapter(sft / "adapter")
    plan = plan_vllm_run(sft)
    assert (plan.model, plan.adapter, plan.reason) == ("org/base-7b", str(sft / "adapter"), None)
    # given as --run, or as the model itself
    for gen in (make_generator("vllm", run=str(sft)), make_generator("vllm", model_spec=str(sft))):
        assert isinstance(gen, VLLMGenerator) and gen._lora_args["lora_path"] == str((sft / "adapter").resolve())
    assert fake_vllm.instances[-1].kw["model"] == "org/base-7b"

    dpo = _run(tmp_path / "dpo", kind="dpo", base_model="org/base-7b", adapter="adapter", start_from=None,
               start_adapters=[])
    _adapter(dpo / "adapter")
    assert plan_vllm_run(dpo).adapter == str(dpo / "adapter")

    guard = _run(tmp_path / "guard", kind="refusal_guard", base_model="org/base-7b", adapter="adapter",
                 start_from=None, start_adapter=None)
    assert plan_vllm_run(guard).adapter == str(guard / "adapter")

    full = _run(tmp_path / "full", kind="sft", base_model="org/base-7b", adapter=None, model_dir="adapter")
    assert (plan_vllm_run(full).model, plan_vllm_run(full).adapter) == (str(full / "adapter"), None)


@pytest.mark.parametrize("manifest, reason", [
    ({"kind": "safemoe", "base_model": "b", "experts": ["violence"]}, "SafeMoE bundle"),
    ({"kind": "dpo", "base_model": "b", "adapter": "adapter", "start_from": "runs/sft",
      "start_adapters": ["start_adapters/0"]}, "stacks 2 adapters"),
    ({"kind": "dcr", "base_model": "b", "adapter": "adapter", "stage1_adapter": "stage1_adapter"},
     "one LoRA adapter per request"),
    ({"kind": "refusal_guard", "base_model": "b", "adapter": "adapter", "start_from": "runs/sft",
      "start_adapter": "start_adapter"}, "one LoRA adapter per request"),
])
def test_runs_vllm_cannot_run_say_why(tmp_path, manifest, reason):
    plan = plan_vllm_run(_run(tmp_path / "run", **manifest))
    assert plan.model is None and reason in plan.reason


def test_safemoe_run_falls_back_to_hf_with_one_message(fake_vllm, tmp_path, monkeypatch, tiny):
    import tactful.runs
    from tactful.eval.runner import EvalConfig, Evaluator

    run = _run(tmp_path / "moe", kind="safemoe", base_model="embedded", experts=["violence"])
    loaded = []

    def load_run_model(path, **kw):
        loaded.append((str(path), kw))
        return tiny[0], tiny[1], f"safemoe:{path}"

    monkeypatch.setattr(tactful.runs, "load_run_model", load_run_model)
    msgs: list[str] = []
    ev = Evaluator(EvalConfig(run=str(run), backend="vllm", out=str(tmp_path / "eval"), device="cpu",
                              dtype="float32"), log=msgs.append)
    gen = ev._ensure_generator()
    assert isinstance(gen, HFGenerator) and not fake_vllm.instances
    assert loaded == [(str(run), {"dtype": "float32", "device": "cpu"})]
    assert len(msgs) == 1 and "SafeMoE" in msgs[0] and "falling back to the hf backend" in msgs[0]

    # the run given as the model is the same request
    msgs.clear()
    ev = Evaluator(EvalConfig(model=str(run), backend="vllm", out=str(tmp_path / "eval2")), log=msgs.append)
    assert isinstance(ev._ensure_generator(), HFGenerator) and ev.config.run == str(run) and len(msgs) == 1

    # make_generator does the same for callers outside the evaluator
    msgs.clear()
    assert isinstance(make_generator("vllm", run=str(run), log=msgs.append), HFGenerator)
    assert len(msgs) == 1 and "falling back" in msgs[0]


def test_evaluator_passes_vllm_options_and_runs(fake_vllm, tmp_path):
    from tactful.eval.runner import EvalConfig, Evaluator

    sft = _run(tmp_path / "sft", kind="sft", base_model="org/base-7b", adapter="adapter")
    _adapter(sft / "adapter")
    ev = Evaluator(EvalConfig(run=str(sft), backend="vllm", out=str(tmp_path / "eval"),
                              vllm_options={"tensor_parallel_size": 2}), log=lambda s: None)
    gen = ev._ensure_generator()
    assert isinstance(gen, VLLMGenerator)
    kw = fake_vllm.instances[0].kw
    assert (kw["model"], kw["tensor_parallel_size"], kw["enable_lora"]) == ("org/base-7b", 2, True)


def test_run_and_adapter_together_is_an_error(fake_vllm, tmp_path):
    sft = _run(tmp_path / "sft", kind="sft", base_model="b", adapter="adapter")
    with pytest.raises(UserError, match="not both"):
        make_generator("vllm", run=str(sft), adapter=str(tmp_path))


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError
    with pytest.raises(UserError) as err:
        VLLMGenerator("embedded")
    msg = str(err.value)
    assert "\n" not in msg and "not installed" in msg and "pip install 'tactful[vllm]'" in msg


def test_broken_vllm_install_names_the_missing_piece(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kw: Any) -> Any:
        if name == "vllm":
            raise ModuleNotFoundError("No module named 'xformers'", name="xformers")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="installed but cannot be imported.*xformers"):
        VLLMGenerator("embedded")
