"""`refusal_guard`: refusal-preserving fine-tuning with SAE refusal features and orthogonal updates.

    capture.py   forward pre-hooks on the attention output projection's input (streamed)
    sae.py       TopK / ReLU+L1 SAEs, SAELens on-disk layout (save and load)
    features.py  refusal latents minus hallucination latents; difference-of-means direction
    heads.py     contrastive head influence (truthfulness vs refusal)
    guard.py     the projection: U, P = I - U U^T, LoRA and full fine-tuning (Adam-safe)
    residual.py  residual-stream coverage: refusal directions at every trained layer, every reader and writer
    coverage.py  which trained modules the guard protects, and each guarded update's measured residual
    safelora.py  the Safe LoRA baseline
    train.py     the pipeline, its config, the run loader and the `tactful sae` entry points
"""

from tactful.methods.refusal_guard.guard import (
    Subspace,
    SubspaceGuard,
    guard_callback,
    load_subspaces,
    orthonormal_basis,
    projector,
    save_subspaces,
    value_basis,
)
from tactful.methods.refusal_guard.sae import SAEConfig, SparseAutoencoder, load_sae, load_sae_dir
from tactful.methods.refusal_guard.train import (
    CONFIG_CLASS,
    RefusalGuardConfig,
    load_refusal_guard_run,
    run,
    sae_features_command,
    sae_train_command,
    train_refusal_guard,
)

__all__ = [
    "CONFIG_CLASS",
    "RefusalGuardConfig",
    "SAEConfig",
    "SparseAutoencoder",
    "Subspace",
    "SubspaceGuard",
    "guard_callback",
    "load_refusal_guard_run",
    "load_sae",
    "load_sae_dir",
    "load_subspaces",
    "orthonormal_basis",
    "projector",
    "run",
    "sae_features_command",
    "sae_train_command",
    "save_subspaces",
    "train_refusal_guard",
    "value_basis",
]
