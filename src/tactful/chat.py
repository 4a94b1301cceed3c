"""What `tactful chat` checks before it generates: the prompt must fit the model's context.

A prompt longer than the context would otherwise run past the model's position table and
come back as a blank (or garbage) reply without a word; `tactful serve` answers such a
request with a 400, and chat says so too.
"""

from __future__ import annotations

from typing import Any, Sequence

from tactful.errors import UserError


def context_length(model: Any) -> int | None:
    """The model's context in tokens (max_position_embeddings), or None when it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_prompts_fit(model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None,
                      max_new_tokens: int) -> None:
    """A UserError naming the first prompt that leaves no room for a reply of max_new_tokens."""
    from tactful.eval.generation import chat_prompts

    context = context_length(model)
    if context is None:
        return
    if max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {context} tokens")
    limit = context - max_new_tokens
    for i, ids in enumerate(chat_prompts(tokenizer, list(prompts), system)):
        if len(ids) > limit:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            raise UserError(f"{which} has {len(ids)} tokens (chat template included); the model's limit is {limit} "
                            f"(its context of {context} tokens minus --max-new-tokens {max_new_tokens})")
