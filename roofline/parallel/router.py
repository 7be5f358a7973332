"""The data-parallel routing policy: outstanding-token balancing with prefix-cache affinity, as pure code.

A request's cost is its estimated prompt tokens plus the tokens it may generate, summed over its
choices. Each prompt prefix has a preferred replica (rendezvous hashing over the replicas that can
take work), so requests that share a system prompt or a conversation reach the replica whose prefix
cache holds it; the preference holds while that replica's outstanding tokens are at most
`overload_factor` x the least-loaded replica's plus `overload_slack_tokens`, and the request spills
to the least-loaded replica beyond that. Nothing here does I/O, so it is tested on its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from roofline.errors import ConfigError

_TOKEN_IDS_IN_KEY_SEP = ","


@dataclass(frozen=True)
class RoutingPolicy:
    """How the router weighs load against prefix affinity."""

    affinity_chars: int = 256  # leading prompt characters (or 1/4 as many token ids) hashed into the prefix key
    overload_factor: float = 1.5  # affinity holds while preferred load <= factor x least load + slack
    overload_slack_tokens: int = 1024  # so a nearly idle pool keeps affinity instead of spilling at once
    chars_per_token: float = 4.0  # prompt-token estimate from text (the router has no tokenizer)
    default_max_tokens: int = 256  # cost of a request that sets no max_tokens (chat's default: up to the context)

    def __post_init__(self) -> None:
        if self.affinity_chars < 0:
            raise ConfigError(f"router: affinity_chars must be >= 0, got {self.affinity_chars}")
        if self.overload_factor < 1.0:
            raise ConfigError(f"router: overload_factor must be >= 1, got {self.overload_factor}")
        if self.overload_slack_tokens < 0:
            raise ConfigError(f"router: overload_slack_tokens must be >= 0, got {self.overload_slack_tokens}")
        if self.chars_per_token <= 0:
            raise ConfigError(f"router: chars_per_token must be > 0, got {self.chars_per_token}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"router: default_max_tokens must be >= 1, got {self.default_max_tokens}")


@dataclass(frozen=True)
class RequestCost:
    """What the router knows of a request before sending it: its prefix key and outstanding tokens."""

    prefix_key: str | None  # None: no prompt seen (tokenize of ids, a malformed body): no affinity
    num_tokens: int  # estimated prompt tokens + tokens it may generate, over all choices


@dataclass
class ReplicaLoad:
    """One replica's share of the work as the router counts it."""

    is_routable: bool = False  # healthy and not being restarted
    num_requests: int = 0  # requests in flight on it
    num_tokens: int = 0  # their RequestCost.num_tokens summed


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _prompt(body: dict, chars_per_token: float) -> tuple[str | None, int, int]:
    """(text hashed for affinity, estimated prompt tokens, number of prompts) of a request body."""
    def from_text(text: str) -> int:
        return int(len(text) / chars_per_token) + 1

    messages = body.get("messages")
    if isinstance(messages, list):  # chat: the messages in order, so a shared system prompt shares the key
        text = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        return text, from_text(text), 1
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, from_text(prompt), 1
    if not isinstance(prompt, list) or not prompt:
        return None, 0, 1
    if all(isinstance(p, str) for p in prompt):
        return prompt[0], sum(from_text(p) for p in prompt), len(prompt)
    if all(isinstance(i, int) for i in prompt):
        return _TOKEN_IDS_IN_KEY_SEP.join(map(str, prompt)), len(prompt), 1
    if all(isinstance(p, list) for p in prompt):
        return _TOKEN_IDS_IN_KEY_SEP.join(map(str, prompt[0])), sum(len(p) for p in prompt), len(prompt)
    return None, 0, 1


def estimate_cost(body: object, policy: RoutingPolicy) -> RequestCost:
    """The prefix key and outstanding-token estimate of an OpenAI request body (any malformed part ignored)."""
    if not isinstance(body, dict):
        return RequestCost(None, policy.default_max_tokens)
    text, num_prompt_tokens, num_prompts = _prompt(body, policy.chars_per_token)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    num_new = _int(max_tokens, policy.default_max_tokens) * max(1, _int(body.get("n"), 1)) * num_prompts
    key = text[:policy.affinity_chars] if text else None
    return RequestCost(key or None, num_prompt_tokens + num_new)


def _score(key: str, replica: int) -> bytes:
    return hashlib.blake2b(f"{replica}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def preferred_replica(key: str, candidates: Collection[int]) -> int:
    """The replica a prefix key prefers among `candidates` (rendezvous hashing: stable as replicas come and go)."""
    return max(candidates, key=lambda i: _score(key, i))


def pick_replica(loads: Sequence[ReplicaLoad], cost: RequestCost, policy: RoutingPolicy,
                 exclude: Collection[int] = ()) -> int | None:
    """The replica to send a request to, or None when no routable replica is left outside `exclude`."""
    candidates = [i for i, load in enumerate(loads) if load.is_routable and i not in exclude]
    if not candidates:
        return None
    # ties go to fewer requests, then the lower index, so an idle pool fills evenly and predictably
    least = min(candidates, key=lambda i: (loads[i].num_tokens, loads[i].num_requests, i))
    if cost.prefix_key is None:
        return least
    preferred = preferred_replica(cost.prefix_key, candidates)
    limit = policy.overload_factor * loads[least].num_tokens + policy.overload_slack_tokens
    return preferred if loads[preferred].num_tokens <= limit else least


class Router:
    """Per-replica load bookkeeping around `pick_replica`; the proxy calls acquire/release around each request."""

    def __init__(self, num_replicas: int, policy: RoutingPolicy | None = None) -> None:
        if num_replicas < 1:
            raise ConfigError(f"router: num_replicas must be >= 1, got {num_replicas}")
        self.policy = policy or RoutingPolicy()
        self.loads = [ReplicaLoad() for _ in range(num_replicas)]

    def set_routable(self, replica: int, is_routable: bool) -> None:
        """Mark a replica as able to take work (healthy) or not (dead, starting, restarting)."""
        self.loads[replica].is_routable = is_routable

    def acquire(self, cost: RequestCost, exclude: Collection[int] = ()) -> int | None:
        """Choose a replica for `cost` and count the request on it; None when none is routable."""
        replica = pick_replica(self.loads, cost, self.policy, exclude)
        if replica is not None:
            load = self.loads[replica]
            load.num_requests += 1
            load.num_tokens += cost.num_tokens
        return replica

    def release(self, replica: int, cost: RequestCost) -> None:
        """The request counted by `acquire` on `replica` is over (answered, failed or abandoned)."""
        load = self.loads[replica]
        load.num_requests -= 1
        load.num_tokens -= cost.num_tokens
