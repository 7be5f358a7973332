"""Sampler: greedy, top-k/top-p/min-p masks, penalties, seeded sampling, and the raw-logprobs contract."""

from __future__ import annotations

import math

import pytest
import torch

from roofline.engine.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p_min_p, prompt_logprobs
from roofline.sampling_params import SamplingParams

NEG_INF = float("-inf")


def row(generator: torch.Generator | None = None, prompt: list[int] | None = None,
        output: list[int] | None = None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), generator, prompt or [0], output or [])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mask(logits: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[bool]:
    """Which tokens survive the masks (True = kept)."""
    out = apply_top_k_top_p_min_p(torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]),
                                  torch.tensor([min_p]))
    return (out[0] > NEG_INF).tolist()


def reference_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax computed independently, in float64."""
    x = logits.double()
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


# probabilities 0.5, 0.3, 0.15, 0.05 placed out of order, so masks must sort
PROBS = [0.15, 0.5, 0.05, 0.3]
LOGITS = [math.log(p) + 1.0 for p in PROBS]  # an offset changes nothing


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    tokens = Sampler()(logits.clone(), [row(temperature=0.0) for _ in range(5)])
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()


def test_greedy_ignores_top_k_top_p_and_seeds():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0]])
    for params in [dict(top_k=1), dict(top_p=0.1), dict(min_p=0.9), dict(seed=5)]:
        assert Sampler()(logits.clone(), [row(seeded(1), temperature=0.0, **params)])[0].token_id == 3


def test_top_k_keeps_the_k_largest():
    assert mask([1.0, 3.0, 2.0, 0.5], top_k=2) == [False, True, True, False]
    assert mask([1.0, 3.0, 2.0, 0.5], top_k=0) == [True] * 4
    assert mask([1.0, 3.0, 2.0, 0.5], top_k=10) == [True] * 4


@pytest.mark.parametrize("top_p, kept", [
    (1.0, [True, True, True, True]),
    (0.9, [True, True, False, True]),   # mass before 0.05 is 0.95 >= 0.9
    (0.7, [False, True, False, True]),  # mass before 0.15 is 0.8 >= 0.7
    (0.4, [False, True, False, False]),  # mass before 0.3 is 0.5 >= 0.4
    (0.01, [False, True, False, False]),  # the top token always stays
])
def test_top_p_nucleus(top_p, kept):
    assert mask(LOGITS, top_p=top_p) == kept


@pytest.mark.parametrize("min_p, kept", [
    (0.0, [True, True, True, True]),
    (0.2, [True, True, False, True]),   # threshold 0.1: drops 0.05
    (0.4, [False, True, False, True]),  # threshold 0.2: drops 0.15 and 0.05
    (1.0, [False, True, False, False]),
])
def test_min_p_relative_to_the_top_probability(min_p, kept):
    assert mask(LOGITS, min_p=min_p) == kept


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    # after top-k=3: 0.5/0.95, 0.3/0.95, 0.15/0.95 = 0.526, 0.316, 0.158; mass before the third is 0.842
    assert mask(LOGITS, top_k=3, top_p=0.9) == [True, True, False, True]
    assert mask(LOGITS, top_k=3, top_p=0.8) == [False, True, False, True]


def test_masks_are_per_row():
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    out = apply_top_k_top_p_min_p(logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.7, 1.0]),
                                  torch.tensor([0.0, 0.0, 0.4]))
    assert (out > NEG_INF).tolist() == [[False, True, False, False], [False, True, False, True],
                                        [False, True, False, True]]
    kept = out > NEG_INF
    assert torch.equal(out[kept], logits[kept])  # survivors keep their values


def test_presence_and_frequency_penalties_count_generated_tokens():
    logits = torch.zeros(1, 5)
    r = row(prompt=[3, 3, 4], output=[1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [r])
    # token 1: 2 x 0.25 + 0.5; token 2: 0.25 + 0.5; prompt tokens are not penalized
    assert out[0].tolist() == pytest.approx([0.0, -1.0, -0.75, 0.0, 0.0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    out = apply_penalties(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out[0].tolist() == pytest.approx([1.0, -4.0, 1.0, 3.0])


def test_penalties_steer_sampling_but_not_the_reported_logprob():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    r = row(output=[0, 0, 0], frequency_penalty=1.0, temperature=0.0, logprobs=1)
    token = Sampler()(logits.clone(), [r])[0]
    assert token.token_id == 1  # token 0 lost 3.0 to the penalty
    assert token.logprob == pytest.approx(reference_logprobs(logits)[0, 1].item(), abs=1e-6)
    assert token.rank == 2


def test_sampling_follows_the_distribution_and_never_leaves_the_mask():
    g = seeded(0)
    n = 4000
    logits = torch.tensor([LOGITS] * n)
    tokens = [t.token_id for t in Sampler()(logits, [row(g, temperature=1.0) for _ in range(n)])]
    freq = [tokens.count(i) / n for i in range(4)]
    assert freq == pytest.approx(PROBS, abs=0.03)
    tokens = [t.token_id for t in Sampler()(logits, [row(g, temperature=1.0, top_p=0.7) for _ in range(n)])]
    assert set(tokens) == {1, 3}
    assert tokens.count(1) / n == pytest.approx(0.5 / 0.8, abs=0.03)


def test_temperature_sharpens_and_flattens():
    g = seeded(0)
    n = 2000
    logits = torch.tensor([LOGITS] * n)
    cold = [t.token_id for t in Sampler()(logits, [row(g, temperature=0.05) for _ in range(n)])]
    hot = [t.token_id for t in Sampler()(logits, [row(g, temperature=100.0) for _ in range(n)])]
    assert cold.count(1) / n > 0.99
    assert all(abs(hot.count(i) / n - 0.25) < 0.05 for i in range(4))


def _draw(seed: int, steps: int = 20) -> list[int]:
    torch.manual_seed(1)  # the same logits every time
    logits = torch.randn(steps, 64)
    g = seeded(seed)
    return [Sampler()(logits[i:i + 1].clone(), [row(g, temperature=1.0)])[0].token_id for i in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    torch.manual_seed(12345)  # the global RNG must not matter when a generator is given
    a = _draw(7)
    torch.manual_seed(999)
    assert _draw(7) == a
    assert _draw(8) != a


def test_seeded_rows_are_independent_of_their_batch_neighbours():
    torch.manual_seed(3)
    logits = torch.randn(3, 64)
    alone = Sampler()(logits[1:2].clone(), [row(seeded(42), temperature=0.8)])[0].token_id
    batch = Sampler()(logits.clone(), [row(seeded(1), temperature=1.0), row(seeded(42), temperature=0.8),
                                       row(None, temperature=0.0)])
    assert batch[1].token_id == alone


def test_logprobs_are_the_raw_log_softmax_with_rank_and_top_entries():
    torch.manual_seed(5)
    logits = torch.randn(3, 100) * 3
    ref = reference_logprobs(logits)
    rows = [row(seeded(0), temperature=0.7, top_k=10, logprobs=5, presence_penalty=1.0, output=[1, 2]),
            row(seeded(1), temperature=0.0, logprobs=0),
            row(seeded(2), temperature=1.3, top_p=0.5, min_p=0.1, logprobs=20, repetition_penalty=1.5)]
    tokens = Sampler()(logits.clone(), rows)
    for i, (t, r) in enumerate(zip(tokens, rows)):
        assert t.logprob == pytest.approx(ref[i, t.token_id].item(), abs=1e-5)
        assert t.rank == 1 + int((logits[i] > logits[i, t.token_id]).sum())
        n = r.params.logprobs
        order = ref[i].argsort(descending=True)[:n]
        assert t.top_ids == order.tolist()
        assert t.top_logprobs == pytest.approx(ref[i, order].tolist(), abs=1e-5)
        assert t.processed_logprob is None  # not asked for
    assert tokens[1].rank == 1 and tokens[1].top_ids == []


def test_no_logprobs_unless_asked():
    token = Sampler()(torch.randn(1, 10), [row(seeded(0))])[0]
    assert token.logprob is None and token.rank is None and token.top_ids == []


def test_processed_logprob_reflects_temperature_and_truncation():
    torch.manual_seed(6)
    logits = torch.randn(3, 40) * 2
    rows = [row(seeded(0), temperature=0.5, logprobs=0, processed_logprobs=True),
            row(seeded(1), temperature=2.0, top_k=3, logprobs=0, processed_logprobs=True),
            row(seeded(2), temperature=0.0, logprobs=0, processed_logprobs=True)]
    tokens = Sampler()(logits.clone(), rows)
    t0 = tokens[0].token_id
    assert tokens[0].processed_logprob == pytest.approx(reference_logprobs(logits[0] / 0.5)[t0].item(), abs=1e-5)
    assert tokens[0].processed_logprob != pytest.approx(tokens[0].logprob, abs=1e-3)
    top3 = logits[1].topk(3).indices
    assert tokens[1].token_id in top3.tolist()
    truncated = reference_logprobs(logits[1, top3] / 2.0)
    assert tokens[1].processed_logprob == pytest.approx(
        truncated[top3.tolist().index(tokens[1].token_id)].item(), abs=1e-5)
    assert tokens[2].processed_logprob == pytest.approx(tokens[2].logprob, abs=1e-5)  # greedy: raw distribution


def test_prompt_logprobs_match_an_independent_log_softmax():
    torch.manual_seed(7)
    logits = torch.randn(4, 30)
    targets = [3, 0, 29, 11]
    entries = prompt_logprobs(logits, targets, [2, 0, 1, 3])
    ref = reference_logprobs(logits)
    for i, (e, t) in enumerate(zip(entries, targets)):
        assert e.token_id == t
        assert e.logprob == pytest.approx(ref[i, t].item(), abs=1e-5)
        assert e.rank == 1 + int((logits[i] > logits[i, t]).sum())
        assert e.top_ids == ref[i].argsort(descending=True)[:[2, 0, 1, 3][i]].tolist()
