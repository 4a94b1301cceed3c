"""`safemoe`: unsafe knowledge isolated in per-domain LoRA experts, mixed per token by a
safety router trained on safe, informative answers ("Dialectics of Alignment", SafeMoE).

    corpus.py   unsafe corpora per harm domain (the base model's judged-compliant answers, or a data set)
    experts.py  one LoRA expert per domain (ordinary PEFT adapters)
    router.py   routed linears, the gates, per-token / static routing, one forward pass
    train.py    router training and the corpus -> experts -> router -> bundle pipeline
    bundle.py   save / load / inspect a bundle; `load_run_model` support

    from tactful.methods.safemoe import load_safemoe
    model, tok = load_safemoe("runs/safemoe")      # generate, evaluate, or train the router further
"""

from tactful.methods.safemoe.bundle import (
    RoutingInspection,
    attach_bundle,
    inspect,
    inspect_command,
    inspect_routing,
    load_safemoe,
    plot_routing,
    save_bundle,
)
from tactful.methods.safemoe.corpus import (
    CorpusSettings,
    UnsafeCorpus,
    build_unsafe_corpus,
    read_unsafe_corpus,
    unsafe_corpus_command,
    write_unsafe_corpus,
)
from tactful.methods.safemoe.experts import ExpertSettings, read_expert, train_expert, train_experts
from tactful.methods.safemoe.router import (
    ExpertWeights,
    RouterSettings,
    SafeMoE,
    SafetyRouter,
    attach_safemoe,
    get_safemoe,
)
from tactful.methods.safemoe.train import (
    CONFIG_CLASS,
    RouterData,
    SafeMoEConfig,
    load_router_examples,
    run,
    train_router,
    train_safemoe,
)

__all__ = [
    "CONFIG_CLASS", "CorpusSettings", "ExpertSettings", "ExpertWeights", "RouterData", "RouterSettings",
    "RoutingInspection", "SafeMoE", "SafeMoEConfig", "SafetyRouter", "UnsafeCorpus", "attach_bundle",
    "attach_safemoe", "build_unsafe_corpus", "get_safemoe", "inspect", "inspect_command", "inspect_routing",
    "load_router_examples", "load_safemoe", "plot_routing", "read_expert", "read_unsafe_corpus", "run",
    "save_bundle", "train_expert", "train_experts", "train_router", "train_safemoe", "unsafe_corpus_command",
    "write_unsafe_corpus",
]
