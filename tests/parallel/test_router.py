"""The routing policy on its own: balancing by outstanding tokens, prefix affinity, overload spill, exclusion."""

from __future__ import annotations

import pytest

from roofline.errors import ConfigError
from roofline.parallel.router import (ReplicaLoad, RequestCost, Router, RoutingPolicy, estimate_cost,
                                      pick_replica, preferred_replica)

POLICY = RoutingPolicy(overload_factor=1.5, overload_slack_tokens=100)


def loads(*num_tokens: int, routable: tuple[bool, ...] | None = None) -> list[ReplicaLoad]:
    routable = routable or (True,) * len(num_tokens)
    return [ReplicaLoad(is_routable=r, num_requests=1 if t else 0, num_tokens=t) for t, r in zip(num_tokens, routable)]


def key_preferring(replica: int, candidates: tuple[int, ...]) -> str:
    """A prefix key whose rendezvous preference among `candidates` is `replica`."""
    return next(k for k in (f"system prompt {i}" for i in range(1000)) if preferred_replica(k, candidates) == replica)


def test_without_a_prefix_the_least_loaded_replica_gets_the_request():
    assert pick_replica(loads(300, 100, 200), RequestCost(None, 10), POLICY) == 1


def test_an_idle_pool_fills_evenly_in_index_order():
    router = Router(3, POLICY)
    for i in range(3):
        router.set_routable(i, True)
    chosen = [router.acquire(RequestCost(None, 50)) for _ in range(6)]
    assert chosen == [0, 1, 2, 0, 1, 2]
    assert [load.num_tokens for load in router.loads] == [100, 100, 100]


def test_release_gives_the_load_back():
    router = Router(2, POLICY)
    router.set_routable(0, True)
    router.set_routable(1, True)
    cost = RequestCost(None, 70)
    replica = router.acquire(cost)
    router.release(replica, cost)
    assert all(load.num_tokens == 0 and load.num_requests == 0 for load in router.loads)


def test_same_prefix_goes_to_the_same_replica_while_not_overloaded():
    key = key_preferring(2, (0, 1, 2))
    # the preferred replica carries more than the least-loaded one, but within factor x least + slack
    assert pick_replica(loads(100, 100, 240), RequestCost(key, 10), POLICY) == 2
    other = key_preferring(0, (0, 1, 2))
    assert pick_replica(loads(100, 100, 240), RequestCost(other, 10), POLICY) == 0


def test_an_overloaded_preferred_replica_spills_to_the_least_loaded():
    key = key_preferring(2, (0, 1, 2))
    # limit = 1.5 x 100 + 100 = 250 < 260
    assert pick_replica(loads(100, 120, 260), RequestCost(key, 10), POLICY) == 0


def test_affinity_keeps_a_shared_prefix_together_through_the_router():
    router = Router(2, RoutingPolicy(overload_slack_tokens=10_000))
    router.set_routable(0, True)
    router.set_routable(1, True)
    body = {"messages": [{"role": "system", "content": "You are terse. " * 30}, {"role": "user", "content": "hi"}]}
    chosen = {router.acquire(estimate_cost({**body, "max_tokens": 8 + i}, router.policy)) for i in range(10)}
    assert len(chosen) == 1


def test_a_replica_that_is_not_routable_or_excluded_gets_nothing():
    key = key_preferring(1, (0, 1, 2))
    assert pick_replica(loads(0, 0, 0, routable=(True, False, True)), RequestCost(key, 10), POLICY) != 1
    assert pick_replica(loads(0, 0, 0), RequestCost(key, 10), POLICY, exclude={1}) != 1
    assert pick_replica(loads(0, 0), RequestCost(None, 1), POLICY, exclude={0, 1}) is None
    assert pick_replica(loads(0, 0, routable=(False, False)), RequestCost(None, 1), POLICY) is None


def test_a_dead_replica_moves_its_prefixes_but_no_others():
    """Rendezvous hashing: removing a replica remaps only the keys that preferred it."""
    keys = [f"prompt {i}" for i in range(200)]
    before = {k: preferred_replica(k, (0, 1, 2)) for k in keys}
    after = {k: preferred_replica(k, (0, 2)) for k in keys}
    assert {k for k in keys if before[k] != after[k]} == {k for k in keys if before[k] == 1}
    assert 30 < sum(before[k] == 1 for k in keys) < 110  # the keys spread over the replicas


def test_cost_counts_prompt_estimate_and_new_tokens_for_every_choice():
    policy = RoutingPolicy(chars_per_token=4.0, default_max_tokens=100)
    assert estimate_cost({"prompt": "x" * 40, "max_tokens": 10}, policy).num_tokens == 11 + 10
    assert estimate_cost({"prompt": "x" * 40, "max_tokens": 10, "n": 3}, policy).num_tokens == 11 + 30
    assert estimate_cost({"prompt": ["a" * 8, "b" * 8], "max_tokens": 5}, policy).num_tokens == 3 + 3 + 10
    assert estimate_cost({"prompt": [5, 6, 7, 8], "max_tokens": 2}, policy).num_tokens == 4 + 2
    assert estimate_cost({"prompt": [[5, 6], [7]], "max_tokens": 2}, policy).num_tokens == 3 + 4
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert estimate_cost(chat, policy).num_tokens > 100  # no max_tokens: the default is counted
    assert estimate_cost({**chat, "max_completion_tokens": 7, "max_tokens": 50}, policy).num_tokens < 50


def test_malformed_bodies_still_get_a_cost_and_no_affinity():
    policy = RoutingPolicy(default_max_tokens=64)
    for body in (None, [], "text", {"prompt": 5}, {"prompt": [1, "a"]}, {"max_tokens": "many"}):
        cost = estimate_cost(body, policy)
        assert cost.prefix_key is None and cost.num_tokens >= 0
    assert estimate_cost({"prompt": "abc", "max_tokens": True}, policy).num_tokens == 1 + 64  # a bool is no count


def test_the_prefix_key_is_the_leading_characters():
    policy = RoutingPolicy(affinity_chars=16)
    a = estimate_cost({"prompt": "shared system prompt, then question A"}, policy)
    b = estimate_cost({"prompt": "shared system prompt, then question B"}, policy)
    assert a.prefix_key == b.prefix_key == "shared system pr"


@pytest.mark.parametrize("field, value", [("overload_factor", 0.5), ("affinity_chars", -1),
                                          ("chars_per_token", 0.0), ("default_max_tokens", 0)])
def test_bad_policy_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        RoutingPolicy(**{field: value})
