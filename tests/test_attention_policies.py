"""Decoding attention policies: each equals dense attention at a full budget, top-k picks the right keys, the
index path equals exact top-k, Loki at full rank equals top-k, H2O keeps its window and heavy hitters, batches
with left padding equal single prompts, chunked prefill equals one pass, and a cache that cannot fit is refused."""

from __future__ import annotations

import math

import pytest
import torch

from tetra.errors import ConfigError
from tetra.infer.attention.factory import make_cache
from tetra.infer.attention.h2o import H2OCache
from tetra.infer.attention.loki import LokiBasis
from tetra.infer.attention.loki_calibration import calibrate_loki
from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.topk import TopKCache
from tetra.infer.context import ContextOptions, check_cache_fits, prefill
from tetra.infer.generate import generate_ids, left_pad
from tetra.model import ModelConfig, Transformer

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_position_embeddings=512)
    model = Transformer(config)
    model.init_weights(std=0.3)  # peaked attention, so that which keys a policy drops matters
    return model.eval()


@pytest.fixture(scope="module")
def loki_file(model, tmp_path_factory):
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, VOCAB, (96,), generator=generator).tolist() for _ in range(4)]
    path = tmp_path_factory.mktemp("loki") / "loki.safetensors"
    calibrate_loki(model, sequences).save(path)
    return str(path)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def decode_logits(model, prompts, policy: AttentionPolicy, steps: int = 6, chunk: int = 0,
                  kv_dtype=None) -> torch.Tensor:
    """Logits [steps, B, vocab] of teacher-forced decoding (the same next tokens whatever the policy)."""
    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    batch, length = ids.shape
    cache = make_cache(model, policy, batch, length + steps, kv_dtype)
    full_mask = None if mask is None else torch.cat((mask, torch.ones((batch, steps), dtype=torch.bool)), dim=1)
    logits = prefill(model, ids, mask, cache, chunk)[:, -1]
    out = [logits]
    forced = torch.arange(steps)[:, None].expand(steps, batch) % (VOCAB - 3) + 3
    for step in range(steps - 1):
        position = length + step
        step_mask = None if full_mask is None else full_mask[:, : position + 1]
        logits = model(forced[step][:, None], attention_mask=step_mask, kv_cache=cache, cache_start=position,
                       last_only=True)[:, -1]
        out.append(logits)
    return torch.stack(out)


def _policy(kind: str, budget: float, loki_file: str, **options) -> AttentionPolicy:
    return AttentionPolicy(kind, budget, recent=options.pop("recent", 8), loki_path=loki_file, **options)


SPARSE = ["topk", "topk-index", "loki", "h2o"]


@pytest.mark.parametrize("kind", SPARSE)
def test_full_budget_equals_dense_and_a_small_one_does_not(model, loki_file, kind):
    prompts = _prompts([80])
    dense = decode_logits(model, prompts, AttentionPolicy())
    full = decode_logits(model, prompts, _policy(kind, 1.0, loki_file))
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    small = decode_logits(model, prompts, _policy(kind, 0.05, loki_file))
    assert (small[1:] - dense[1:]).abs().max() > 1e-3  # the comparison above can fail


def test_topk_over_a_hand_built_cache_attends_the_best_keys_and_the_window():
    config = ModelConfig(vocab_size=8, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4)
    cache = TopKCache(config, 1, 16, torch.float32, "cpu", AttentionPolicy("topk", budget=2, recent=3))
    keys = torch.zeros(1, 1, 10, 4)
    keys[0, 0, :, 0] = torch.tensor([0.1, 3.0, 0.2, 0.0, 2.5, 0.3, 0.1, 0.0, 0.2, 0.1])
    values = torch.randn(1, 1, 10, 4, generator=torch.Generator().manual_seed(0))
    cache.update(0, keys, values, 0)
    cache.end_prefill(None)  # prefix = positions 0..6, window = 7..9 plus the new token
    q = torch.zeros(1, 2, 1, 4)
    q[0, :, 0, 0] = 1.0
    new_key, new_value = torch.zeros(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    out = cache.attend(0, q, new_key, new_value, None, 10)
    chosen = [1, 4, 7, 8, 9, 10]  # the two best prefix keys, then the window and the new token
    all_keys = torch.cat((keys, new_key), dim=2)[0, 0, chosen]
    all_values = torch.cat((values, new_value), dim=2)[0, 0, chosen]
    weights = torch.softmax(all_keys @ q[0, 0, 0] / math.sqrt(4), dim=0)
    torch.testing.assert_close(out[0, 0, 0], weights @ all_values)
    torch.testing.assert_close(out[0, 1, 0], weights @ all_values)


def test_index_backed_topk_with_a_flat_index_equals_exact_topk(model, loki_file):
    prompts = _prompts([90, 60])
    exact = decode_logits(model, prompts, _policy("topk", 0.1, loki_file))
    indexed = decode_logits(model, prompts, _policy("topk-index", 0.1, loki_file, index="flat"))
    torch.testing.assert_close(indexed, exact, atol=1e-5, rtol=1e-5)


def test_ivf_probing_every_list_and_hnsw_equal_exact_topk(model, loki_file):
    prompts = _prompts([300])
    exact = decode_logits(model, prompts, _policy("topk", 0.1, loki_file))
    for options in ({"index": "ivf", "probe": 1.0}, {"index": "hnsw"}):
        found = decode_logits(model, prompts, _policy("topk-index", 0.1, loki_file, **options))
        torch.testing.assert_close(found, exact, atol=1e-4, rtol=1e-4)
    # Probing a quarter of the lists of random (unclustered) keys misses some of the best ones.
    partial = decode_logits(model, prompts, _policy("topk-index", 0.1, loki_file, index="ivf", probe=0.25))
    assert (partial - exact).abs().max() > 1e-3


def test_loki_at_full_rank_equals_exact_topk_and_low_rank_differs(model, loki_file):
    prompts = _prompts([90])
    exact = decode_logits(model, prompts, _policy("topk", 0.1, loki_file))
    full_rank = decode_logits(model, prompts, _policy("loki", 0.1, loki_file, rank=16))
    torch.testing.assert_close(full_rank, exact, atol=1e-5, rtol=1e-5)
    low_rank = decode_logits(model, prompts, _policy("loki", 0.1, loki_file, rank=1))
    assert (low_rank - exact).abs().max() > 1e-4


def test_loki_basis_is_orthonormal_and_sorted(loki_file):
    basis = LokiBasis.load(loki_file)
    for vectors, values in zip(basis.components, basis.eigenvalues, strict=True):
        eye = torch.eye(vectors.shape[-1]).expand_as(vectors)
        torch.testing.assert_close(vectors.transpose(-1, -2) @ vectors, eye, atol=1e-5, rtol=0)
        assert bool((values[:, :-1] >= values[:, 1:] - 1e-6).all())
    assert 0 < basis.explained(4)[0] < basis.explained(8)[0] <= 1.0 + 1e-6


def test_loki_calibration_of_another_model_is_refused(loki_file):
    other = ModelConfig(vocab_size=VOCAB, hidden_size=64, n_layers=3, n_heads=4, n_kv_heads=2)
    with pytest.raises(ConfigError, match="belongs to another model"):
        LokiBasis.for_model(other, loki_file)
    with pytest.raises(ConfigError, match="tetra loki calibrate"):
        LokiBasis.for_model(other, loki_file + ".missing")


def test_h2o_keeps_the_recent_window_and_the_heaviest_keys():
    config = ModelConfig(vocab_size=8, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4)
    cache = H2OCache(config, 1, 32, torch.float32, "cpu", AttentionPolicy("h2o", budget=3, recent=4))
    cache.update(0, torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4), 0)
    cache.length = 20
    mass = torch.zeros(20)
    mass[[2, 9, 11, 17, 18]] = torch.tensor([5.0, 4.0, 3.0, 9.0, 9.0])  # 17, 18 are in the window anyway
    mass[5] = 2.0
    cache.mass[0, 0, 0, :20] = mass
    cache.end_prefill(None)
    assert cache.kept_positions(0)[0, 0].tolist() == [2, 9, 11, 16, 17, 18, 19]
    # One decode step: capacity stays 4 recent + 3 heavy, the window slides and position 16 competes on mass.
    q = torch.zeros(1, 2, 1, 4)
    cache.attend(0, q, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), None, 20)
    kept = cache.kept_positions(0)[0, 0].tolist()
    assert len(kept) == 7 and kept[-4:] == [17, 18, 19, 20] and 2 in kept and 9 in kept
    # A zero query spreads each of its 2 heads' weight evenly over the 8 keys it saw: 2/8 more mass for each.
    mass_after = dict(zip(kept, cache.kept[0]["mass"][0, 0].tolist(), strict=True))
    assert mass_after[19] == pytest.approx(0.25) and mass_after[2] == pytest.approx(5.25)


@pytest.mark.parametrize("kind", ["dense", *SPARSE])
def test_left_padded_batch_equals_single_prompts(model, loki_file, kind):
    prompts = _prompts([70, 45, 58], seed=3)
    policy = _policy(kind, 6, loki_file)  # a number of keys: the same for every row whatever its padding
    batched = decode_logits(model, prompts, policy)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(batched[:, row], decode_logits(model, [prompt], policy)[:, 0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "topk", "h2o"])
def test_chunked_prefill_equals_one_pass(model, loki_file, kind):
    prompts = _prompts([75, 50])
    policy = _policy(kind, 0.2, loki_file)
    torch.testing.assert_close(decode_logits(model, prompts, policy, chunk=16),
                               decode_logits(model, prompts, policy), atol=1e-5, rtol=1e-5)


def test_bf16_cache_tracks_the_fp32_one(model, loki_file):
    prompts = _prompts([64])
    fp32 = decode_logits(model, prompts, AttentionPolicy())
    bf16 = decode_logits(model, prompts, AttentionPolicy(), kv_dtype=torch.bfloat16)
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_generate_ids_with_each_policy_and_a_full_budget_matches_dense(model, loki_file):
    prompts = _prompts([60, 40])
    dense = generate_ids(model, prompts, 8)
    for kind in SPARSE:
        context = ContextOptions(_policy(kind, 1.0, loki_file), prefill_chunk=32)
        assert generate_ids(model, prompts, 8, context=context) == dense, kind


def test_a_cache_that_cannot_fit_is_refused_with_the_memory_it_needs(model):
    with pytest.raises(ConfigError, match=r"needs 0\.\d+ GiB of KV cache.*--kv-dtype bf16"):
        check_cache_fits(model.config, 1, 1_000_000, torch.float32, "cpu", AttentionPolicy(), available=10**6)
    assert check_cache_fits(model.config, 1, 100, torch.float32, "cpu", AttentionPolicy(), available=10**9) == \
        100 * 2 * 2 * 2 * 16 * 4


def test_bad_policy_options_are_named():
    with pytest.raises(ConfigError, match="--attention 'sparse' is not one of"):
        AttentionPolicy("sparse")
    with pytest.raises(ConfigError, match="--budget must be > 0"):
        AttentionPolicy("topk", budget=0)


@pytest.mark.parametrize("length,count", [(1000, 20), (70000, 1400), (70000, 30000)])
def test_select_top_finds_what_torch_topk_finds(length, count):
    from tetra.infer.attention.union import select_top

    scores = torch.randn(2, 2, 3, length, generator=torch.Generator().manual_seed(length))
    found, expected = select_top(scores, count), torch.topk(scores, count, dim=-1)
    assert torch.equal(found.indices.sort(-1).values, expected.indices.sort(-1).values)
    torch.testing.assert_close(torch.gather(scores, -1, found.indices), found.values)


def test_gather_rows_reads_a_slice_of_a_longer_cache_without_copying_it():
    from tetra.infer.attention.union import gather_rows

    full = torch.randn(3, 2, 50, 4)
    index = torch.randint(0, 30, (3, 2, 4, 6), generator=torch.Generator().manual_seed(0))
    for rows in (full[:, :, :30], full[1:, :, :30], full[:, 1:, 5:35]):
        expected = torch.stack([torch.stack([rows[b, h][index[b, h]] for h in range(rows.shape[1])])
                                for b in range(rows.shape[0])])
        assert torch.equal(gather_rows(rows, index[: rows.shape[0], : rows.shape[1]]), expected)
