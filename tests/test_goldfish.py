"""The goldfish loss: drop rate, offset invariance, order sensitivity, normalization, gradient accumulation,
plain cross-entropy when off, and a training run that logs the loss on the left-out tokens."""

from __future__ import annotations

import pytest
import torch

from test_train import run_config
from tetra.config import GoldfishConfig
from tetra.errors import ConfigError
from tetra.model import ModelConfig, Transformer
from tetra.train import trainer
from tetra.train.goldfish import goldfish_drop_mask, window_hashes
from tetra.train.losses import next_token_loss, per_token_loss
from tetra.train.metrics import read_metrics
from tetra.train.replica import Replica


def _random_tokens(rows: int, length: int, vocab: int = 50000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_hash_mode_drops_one_in_k_on_random_text(k):
    tokens = _random_tokens(128, 8193)
    drop = goldfish_drop_mask(tokens, GoldfishConfig(k=k))
    droppable = drop[:, 11:]  # targets with a full 13-token window
    assert abs(droppable.float().mean().item() - 1 / k) <= 0.01 / k  # within 1% of 1/k


def test_windows_with_zero_tokens_and_small_vocabularies_still_drop_one_in_k():
    """The reference's product-of-ids hash sends every window holding a 0 to the same value."""
    tokens = _random_tokens(64, 4097, vocab=8)  # token 0 in most windows
    assert abs(goldfish_drop_mask(tokens, GoldfishConfig(k=4))[:, 11:].float().mean().item() - 0.25) <= 0.005


def test_never_drops_targets_before_a_full_window():
    drop = goldfish_drop_mask(_random_tokens(256, 40), GoldfishConfig(k=2, context=13))
    assert not drop[:, :11].any()  # targets are tokens 1..11: fewer than 13 tokens end at them
    assert drop[:, 11].any()  # token 12 ends the first full window


def test_the_same_passage_gets_the_same_mask_at_any_offset_and_in_any_batch():
    config = GoldfishConfig(k=4, context=13)
    passage = _random_tokens(1, 200, seed=1)[0]
    first = torch.cat([_random_tokens(1, 5, seed=2)[0], passage, _random_tokens(1, 30, seed=3)[0]])
    second = torch.cat([_random_tokens(1, 77, seed=4)[0], passage])
    batch = torch.stack([first[:200], _random_tokens(1, 200, seed=5)[0]])  # another row beside it
    drop_first = goldfish_drop_mask(first[None], config)[0]
    drop_second = goldfish_drop_mask(second[None], config)[0]
    drop_batch = goldfish_drop_mask(batch, config)[0]
    # Target index i is token i + 1. Passage token p (p >= 12) is at token 5 + p and 77 + p.
    in_passage = torch.arange(12, 200)
    assert torch.equal(drop_first[in_passage + 4], drop_second[in_passage + 76])
    assert drop_first[in_passage + 4].float().mean() > 0.1
    assert torch.equal(drop_batch, drop_first[:199])


def test_the_hash_is_order_sensitive():
    windows = _random_tokens(2000, 13, seed=6)
    forward = window_hashes(windows, 13)
    assert torch.equal(forward, window_hashes(windows.clone(), 13))
    for permuted in (windows.flip(1), windows.roll(1, dims=1), windows[:, [1, 0, *range(2, 13)]]):
        assert (window_hashes(permuted, 13) != forward).float().mean() > 0.999


def test_static_mode_drops_every_kth_target():
    drop = goldfish_drop_mask(_random_tokens(3, 17), GoldfishConfig(k=4, mode="static"))
    assert drop[0].nonzero().flatten().tolist() == [3, 7, 11, 15]  # tokens 4, 8, 12, 16
    assert torch.equal(drop[0], drop[2])


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   intermediate_size=48, max_position_embeddings=64))


def test_the_loss_is_the_mean_over_kept_tokens_and_the_dropped_loss_is_reported():
    model, tokens = _model(), _random_tokens(4, 33, vocab=64, seed=7)
    config = GoldfishConfig(k=3, context=4)
    step = Replica(None).accumulate(model, [tokens], config)
    with torch.no_grad():
        losses = per_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
    drop = goldfish_drop_mask(tokens, config)
    assert step.loss == pytest.approx(losses[~drop].mean().item(), rel=1e-6)
    assert step.dropped_loss == pytest.approx(losses[drop].mean().item(), rel=1e-6)
    assert step.dropped_fraction == pytest.approx(drop.float().mean().item())


def test_gradients_come_from_kept_tokens_only_and_accumulation_changes_nothing():
    config = GoldfishConfig(k=2, context=3)
    tokens = _random_tokens(8, 17, vocab=64, seed=8)
    whole, halves = _model(), _model()
    Replica(None).accumulate(whole, [tokens], config)
    Replica(None).accumulate(halves, list(tokens.chunk(4)), config)  # micro-batches with unequal kept counts
    for (name, a), b in zip(whole.named_parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Equal to the mean cross-entropy over the kept targets alone, written out by hand.
    by_hand = _model()
    kept = ~goldfish_drop_mask(tokens, config)
    per_token_loss(by_hand(tokens[:, :-1]), tokens[:, 1:])[kept].mean().backward()
    for (name, a), b in zip(whole.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_off_equals_plain_cross_entropy():
    tokens = _random_tokens(4, 33, vocab=64, seed=9)
    plain, goldfish_off = _model(), _model()
    loss, _ = next_token_loss(plain, tokens)
    loss.backward()
    step = Replica(None).accumulate(goldfish_off, [tokens], GoldfishConfig(k=0))
    assert step.loss == pytest.approx(loss.item(), rel=1e-6) and step.dropped_loss is None
    for a, b in zip(plain.parameters(), goldfish_off.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("values, message", [({"k": 1}, "train.goldfish.k"), ({"mode": "random"}, "hash, static"),
                                             ({"context": 0}, "train.goldfish.context")])
def test_bad_settings_are_named(prepared_data, tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        run_config(prepared_data, tmp_path / "run", train={"goldfish": values})


def test_training_logs_the_loss_on_left_out_tokens(prepared_data, tmp_path):
    config, model = run_config(prepared_data, tmp_path / "run", train={"goldfish": {"k": 4, "context": 5}})
    trainer.train(config, model, show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(0.15 < r["goldfish_dropped_fraction"] < 0.35 and r["goldfish_dropped_loss"] > 0 for r in records)
    assert "goldfish = { k = 4, context = 5, mode = \"hash\" }" in (tmp_path / "run" / "config.toml").read_text()
