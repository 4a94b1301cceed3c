"""Run directories: the resolved config, a manifest of what produced the run, atomic writes.

A run directory is what every `tactful train` and `tactful eval` writes:

    config.json     the resolved configuration (after defaults and CLI overrides)
    manifest.json   versions, base model, data hashes, seed, git commit, timings
    ...             method artifacts (adapters, metrics, reports)

API keys and other secrets never enter a manifest: values whose key looks secret are
redacted before writing.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from tactful.errors import UserError
from tactful.io import atomic_write_json, atomic_write_text, ensure_dir, read_text_file, sha256_file, sha256_text

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)", re.I)


def redact(obj: Any) -> Any:
    """Copy of a config with secret-looking values replaced (keys named *api_key*, *token*, ...)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY.search(k) and not k.endswith("_env") and isinstance(v, str) and v:
                out[k] = "<redacted>"
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("tactful", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5,
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def data_fingerprint(source: str | os.PathLike | list | None) -> str | None:
    """sha256 of a data file, or of the JSON of in-memory records."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        return sha256_file(source)
    import json

    return sha256_text(json.dumps(source, sort_keys=True, default=str))


class RunDir:
    """A directory holding one run's config, manifest and artifacts.

    In a multi-process launch only the main process writes (the others hold the same values and
    return the path unwritten), so the processes never race on a file.
    """

    def __init__(self, path: str | os.PathLike, what: str = "run directory"):
        self.path = ensure_dir(path, what)

    @staticmethod
    def _writes() -> bool:
        from tactful.distributed import is_main_process

        return is_main_process()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Any) -> Path:
        if not self._writes():
            return self.path / "config.json"
        return atomic_write_json(self.path / "config.json", redact(config))

    def write_manifest(
        self,
        *,
        kind: str,
        base_model: str | None = None,
        seed: int | None = None,
        data: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        if not self._writes():
            return self.path / "manifest.json"
        manifest = {
            "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": base_model,
            "seed": seed,
            "data": {k: data_fingerprint(v) if not isinstance(v, str) or Path(v).is_file() else v
                     for k, v in (data or {}).items()},
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": " ".join(sys.argv),
            "platform": platform.platform(),
        }
        if extra:
            manifest.update(redact(dict(extra)))
        return atomic_write_json(self.path / "manifest.json", manifest)

    def update_manifest(self, **fields: Any) -> Path:
        import json

        path = self.path / "manifest.json"
        if not self._writes():
            return path
        manifest = json.loads(path.read_text()) if path.exists() else {}
        manifest.update(redact(fields))
        return atomic_write_json(path, manifest)

    def read_json(self, name: str) -> Any:
        import json

        return json.loads((self.path / name).read_text())

    def write_json(self, name: str, obj: Any) -> Path:
        if not self._writes():
            return self.path / name
        return atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        if not self._writes():
            return self.path / name
        return atomic_write_text(self.path / name, text)


# ---------------------------------------------------------------- loading a trained run

# Run kinds whose model is not "base model + one PEFT adapter" (SafeMoE bundles) register
# a loader here: kind -> function(run_dir, manifest) -> (model, tokenizer).
RUN_LOADERS: dict[str, Any] = {}


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    import json

    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a tactful run directory (no manifest.json)")
    try:
        manifest = json.loads(read_text_file(path, "manifest"))
    except json.JSONDecodeError as e:
        raise UserError(f"malformed manifest ({e.msg})", where=f"{path}:{e.lineno}") from None
    if not isinstance(manifest, dict):
        raise UserError("malformed manifest (expected a JSON object)", where=str(path))
    return manifest


def load_run_model(run_dir: str | os.PathLike, **kw: Any) -> tuple[Any, Any, str]:
    """Load the model a training run produced: its base model plus its adapter (or a bundle).

    Returns (model, tokenizer, description).
    """
    from tactful.models import load_model

    manifest = read_manifest(run_dir)
    kind = manifest.get("kind", "")
    if kind not in RUN_LOADERS:
        # Method modules register their loaders on import; import the one that made this run.
        from tactful.methods.registry import METHODS, method_module

        if kind in METHODS:
            method_module(kind)
    if kind in RUN_LOADERS:
        model, tok = RUN_LOADERS[kind](Path(run_dir), manifest, **kw)
        return model, tok, f"{kind}:{run_dir}"
    base = manifest.get("base_model")
    if not base:
        raise UserError(f"{run_dir}/manifest.json names no base_model")
    adapter = manifest.get("adapter")
    adapter_dir = str(Path(run_dir) / adapter) if adapter else None
    full = manifest.get("model_dir")  # full fine-tuning saves a whole model
    spec = str(Path(run_dir) / full) if full else base
    model, tok = load_model(spec, adapter=None if full else adapter_dir, **kw)
    return model, tok, f"{kind}:{run_dir}"
