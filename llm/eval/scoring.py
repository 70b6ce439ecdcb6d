"""Log-likelihood of continuations, shared by the benchmark commands.

A request is a pair (context ids, continuation ids). The model reads the context and all but the last continuation
token, and the log-probabilities of the continuation's tokens are summed, as lm-evaluation-harness's hf backend
does: a pair longer than block_size + 1 loses context tokens from the left, and a continuation alone longer than
block_size is refused. Requests are batched longest first, right-padded (a causal model's earlier positions never
see the padding).
"""
import json
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError
from ..data.tokenizers import SEQUENCE_TOKENIZERS


def load_causal(ckpt: str, device: str):
    """(checkpoint folder, causal model in eval mode on the device, tokenizer, tokenizer meta) of a run or checkpoint
    folder; a bidirectional model (masked LM, diffusion) is refused."""
    from ..checkpoint import load_trained
    from ..data.tokenizers import tokenizer_from_meta
    from ..precision import pick_precision

    folder, model, meta = load_trained(ckpt)
    if not model.causal:
        raise ConfigError(f"{folder} is bidirectional (objective={model.config.objective}): it does not score "
                          "continuations left to right; evaluate it with python -m llm.eval data (or fasta)")
    return folder, model.to(pick_precision(device, "float32").device), tokenizer_from_meta(meta), meta


def prefix_token(tokenizer, meta: dict) -> int:
    """The token that stands before a text with no context: end-of-text, a sequence tokenizer's begin token, else the
    newline when it is one token (a char vocabulary of one document has no end-of-text)."""
    if meta["tokenizer"] in SEQUENCE_TOKENIZERS:
        return tokenizer.bos
    if tokenizer.eot is not None:
        return tokenizer.eot
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ConfigError(f"the {meta['tokenizer']} tokenizer has no end-of-text or newline token to begin a text "
                          "without context; give every request a context")
    return newline[0]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits a causal request: trailing spaces of the
    context move to the continuation, the whole text is encoded and the continuation is what follows the context's
    own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], device: torch.device | str,
                          batch_size: int = 16, name: Callable[[int], str] = lambda i: f"request {i + 1}",
                          ) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding gives every continuation token) of each
    (context ids, continuation ids) pair; `name(i)` names pair i in the error for a continuation that is empty or
    longer than block_size, or a pair without context."""
    block = model.config.block_size
    for i, (context, continuation) in enumerate(pairs):
        if not context or not 0 < len(continuation) <= block:
            raise ConfigError(f"{name(i)}: {len(context)} context and {len(continuation)} continuation tokens; "
                              f"a request needs a context and 1 to block_size={block} continuation tokens")
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(block + 1):][:-1] for i in chunk]
            width = max(len(r) for r in rows)
            idx = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # (B, width)
            logits = model(idx).logits  # (B, width, V)
            for b, (i, row) in enumerate(zip(chunk, rows)):
                targets = torch.tensor(pairs[i][1], device=device)  # (n,)
                scored = logits[b, len(row) - len(targets):len(row)].float().log_softmax(-1)  # (n, V)
                total = scored.gather(-1, targets[:, None]).sum().item()
                results[i] = (total, bool((scored.argmax(-1) == targets).all()))
    finally:
        model.train(was_training)
    return results


def write_json(path: str | None, result: dict) -> None:
    """Writes the result to path, when one is given (numpy scalars as numbers, other values JSON cannot hold as
    text)."""
    if path:
        text = json.dumps(result, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        Path(path).write_text(text)
