"""TenantShares: weighted fair sharing of computed tokens across tenants (API keys), by virtual counters.

Each tenant has a virtual token counter that grows by the tokens the engine computes for it divided by
its weight; among waiting requests of one priority, the tenant with the lowest counter goes first
(the virtual token counter of Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).
A tenant that was idle does not bank credit: when it becomes active again its counter is lifted to the
lowest counter among the active tenants, so it shares from now on instead of taking over until it has
caught up with tokens it never asked for.
"""

from __future__ import annotations

from collections import Counter

DEFAULT_TENANT = ""  # requests that name no tenant share one


class TenantShares:
    """Virtual token counters per tenant, with weights (a tenant of weight 2 gets twice the tokens)."""

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        for name, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"tenant {name!r}: weight must be > 0, got {w}")
        self.counters: dict[str, float] = {}
        self._num_active: Counter[str] = Counter()  # unfinished requests per tenant
        self.tokens: Counter[str] = Counter()  # tokens computed per tenant since start

    def activate(self, tenant: str) -> None:
        """A request of `tenant` arrived."""
        if not self._num_active[tenant]:
            active = [self.counters.get(t, 0.0) for t, n in self._num_active.items() if n and t != tenant]
            floor = min(active) if active else 0.0
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._num_active[tenant] += 1

    def release(self, tenant: str) -> None:
        """A request of `tenant` finished."""
        if self._num_active[tenant] > 0:
            self._num_active[tenant] -= 1
        if not self._num_active[tenant]:
            del self._num_active[tenant]

    def charge(self, tenant: str, num_tokens: int) -> None:
        """The engine computed `num_tokens` for `tenant`."""
        self.tokens[tenant] += num_tokens
        self.counters[tenant] = self.counters.get(tenant, 0.0) + num_tokens / self.weights.get(tenant, 1.0)

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (lower goes first)."""
        return self.counters.get(tenant, 0.0)
