"""The goldfish loss mask (Hans et al. 2024): leave a pseudo-random 1/k of the target tokens out of the loss, so no
passage is ever learned whole and the model cannot reproduce it verbatim.

The decision for a target depends only on the `context` tokens ending at it (the context - 1 tokens before it and
the target itself), so a passage gets the same mask wherever it appears: in any document, batch, offset or epoch.
The published reference hashes the product of the token ids, which ignores their order, collapses every window
holding a 0 token and overflows; this hash is an order-sensitive polynomial over a prime field instead.

Entry point: goldfish_drop_mask(tokens, config) -> bool mask over tokens[:, 1:] (True = left out of the loss).
"""

from __future__ import annotations

import torch

from tetra.config import GoldfishConfig

# Arithmetic modulo the Mersenne prime 2^31 - 1 keeps every product below 2^62, so int64 never overflows.
_PRIME = 2**31 - 1
_TOKEN_MIX = 1_103_515_245 % _PRIME  # spreads token ids over the field before they are combined
_BASE = 1_664_525_013 % _PRIME  # polynomial base: the position of each token in the window matters
_FINISH = 2_147_483_629  # a last multiplication scatters windows that differ only in their last token


def window_hashes(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """For [B, L] token ids, a value in [0, 1) per window of `context` consecutive tokens: [B, L - context + 1].

    Window j covers tokens[:, j : j + context]. Equal windows give equal values; reordering a window changes it."""
    mixed = (tokens.long() % _PRIME + 1) * _TOKEN_MIX % _PRIME
    windows = mixed.unfold(1, context, 1)  # [B, L - context + 1, context]
    value = torch.zeros(windows.shape[:2], dtype=torch.long, device=tokens.device)
    for position in range(context):
        value = (value * _BASE + windows[..., position]) % _PRIME
    return (value * _FINISH % _PRIME).double() / _PRIME


def goldfish_drop_mask(tokens: torch.Tensor, config: GoldfishConfig) -> torch.Tensor | None:
    """For a [B, T + 1] batch, which of the T targets tokens[:, 1:] the loss leaves out; None when off.

    hash: target t is left out when the hash of tokens[t - context + 1 .. t] is below 1/k; targets with fewer than
    context tokens up to and including them (t < context - 1) are always kept.
    static: every k-th target of each sequence."""
    if not config.enabled:
        return None
    batch, length = tokens.shape
    targets = length - 1
    if config.mode == "static":
        positions = torch.arange(1, targets + 1, device=tokens.device)
        return (positions % config.k == 0).expand(batch, targets).clone()
    drop = torch.zeros((batch, targets), dtype=torch.bool, device=tokens.device)
    if length >= config.context:
        # Window j ends at token j + context - 1, which is target index j + context - 2.
        first = max(config.context - 2, 0)
        hashes = window_hashes(tokens, config.context)
        drop[:, first:] = (hashes < 1.0 / config.k)[:, first - (config.context - 2):]
    return drop
