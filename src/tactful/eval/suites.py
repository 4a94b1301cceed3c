"""Evaluation suites: small YAML files in the spirit of lm-evaluation-harness tasks.

    name: safety
    description: Harmful requests; a safe model refuses them.
    dataset: builtin-harmful        # registry name or a local file
    path: data/advbench.csv         # optional: a local copy of a registry benchmark (relative to the suite file)
    split: test
    n: 200                          # optional cap (seeded subsample)
    prompt_field: prompt            # for local files whose prompt column has another name
    expected: refuse                # refuse | comply | multiple-choice | informative | policy
    judge: embedding-minilm         # default judge; `tactful eval --judge` overrides it
    metric: safe_rate               # safe_rate | compliance_rate | accuracy | mc2 | mean_score | policy_agreement
    generation: {max_new_tokens: 96}
    policy: path/to/policy.yaml     # policy suites only

Built-in suites live in tactful/eval/suites/*.yaml; any path to a YAML file works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tactful.errors import UserError
from tactful.io import read_text_file

EXPECTED = ("refuse", "comply", "multiple-choice", "informative", "policy")
METRICS = {
    "refuse": ("safe_rate",),
    "comply": ("compliance_rate",),
    "multiple-choice": ("accuracy", "mc2"),
    "informative": ("mean_score",),
    "policy": ("policy_agreement",),
}
DEFAULT_JUDGE = {
    "refuse": "embedding-minilm",
    "comply": "embedding-minilm",
    "multiple-choice": None,
    "informative": "informativeness-proxy",
    "policy": "policy-rules",
}
_FIELDS = {
    "name": str, "description": str, "dataset": str, "path": (str, type(None)), "split": (str, type(None)), "n": (int, type(None)),
    "prompt_field": str, "expected": str, "judge": (str, type(None)), "metric": str, "generation": dict,
    "policy": (str, type(None)), "seed": int,
}
_GEN_FIELDS = {"max_new_tokens": int, "do_sample": bool, "temperature": (int, float), "top_p": (int, float),
               "batch_size": int, "system": (str, type(None))}


@dataclass
class Suite:
    name: str
    dataset: str
    expected: str
    description: str = ""
    split: str | None = None
    path: str | None = None
    n: int | None = None
    prompt_field: str = "prompt"
    judge: str | None = None
    metric: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    seed: int = 0
    source: str = ""  # file the suite came from

    @property
    def generates(self) -> bool:
        return self.expected != "multiple-choice"


def suites_dir() -> Path:
    return Path(__file__).parent / "suites"


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a suite YAML file; validation errors name the file and field."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = suites_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown suite {name_or_path!r}; built-in suites: {', '.join(builtin_suites())}, "
                            "or give a path to a suite YAML file")
    if not path.is_file():
        raise UserError(f"suite file {name_or_path} does not exist")
    try:
        raw = yaml.safe_load(read_text_file(path, "suite file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"malformed YAML ({getattr(e, 'problem', e)})", where=where) from None
    return suite_from_dict(raw, source=str(path))


def suite_from_dict(raw: Any, *, source: str = "<suite>") -> Suite:
    if not isinstance(raw, dict):
        raise UserError("a suite file must be a YAML mapping", where=source)
    for key, value in raw.items():
        if key not in _FIELDS:
            raise UserError(f"unknown field {key!r}; allowed: {', '.join(_FIELDS)}", where=source)
        if not isinstance(value, _FIELDS[key]) or (isinstance(value, bool) and _FIELDS[key] is int):
            raise UserError(f"field {key!r} has the wrong type ({type(value).__name__})", where=source)
    for key in ("name", "dataset", "expected"):
        if key not in raw:
            raise UserError(f"missing required field {key!r}", where=source)
    expected = raw["expected"]
    if expected not in EXPECTED:
        raise UserError(f"field 'expected' must be one of {', '.join(EXPECTED)}, got {expected!r}", where=source)
    metric = raw.get("metric") or METRICS[expected][0]
    if metric not in METRICS[expected]:
        raise UserError(f"metric {metric!r} does not fit expected={expected}; use one of "
                        f"{', '.join(METRICS[expected])}", where=source)
    gen = raw.get("generation") or {}
    for key, value in gen.items():
        if key not in _GEN_FIELDS:
            raise UserError(f"unknown generation option {key!r}; allowed: {', '.join(_GEN_FIELDS)}", where=source)
        if not isinstance(value, _GEN_FIELDS[key]):
            raise UserError(f"generation option {key!r} has the wrong type", where=source)
        if isinstance(value, float) and not math.isfinite(value):  # YAML .nan / .inf
            raise UserError(f"generation option {key!r} must be a finite number, got {value}", where=source)
    if raw.get("n") is not None and raw["n"] <= 0:
        raise UserError("field 'n' must be positive", where=source)
    if expected == "policy" and not raw.get("policy"):
        raise UserError("policy suites need a 'policy' file", where=source)
    return Suite(
        name=raw["name"], dataset=raw["dataset"], expected=expected, description=raw.get("description", ""),
        split=raw.get("split"), path=_resolve(raw.get("path"), source), n=raw.get("n"), prompt_field=raw.get("prompt_field", "prompt"),
        judge=raw.get("judge", DEFAULT_JUDGE[expected]), metric=metric, generation=dict(gen),
        policy=_resolve(raw.get("policy"), source), seed=raw.get("seed", 0), source=source,
    )


def _resolve(path: str | None, source: str) -> str | None:
    """Suite-relative paths resolve against the suite file's folder (if the file exists there)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_absolute() and Path(source).parent.joinpath(p).exists():
        return str(Path(source).parent / p)
    return str(p)
