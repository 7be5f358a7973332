"""KVCacheManager: paged KV blocks, per-request block tables, prefix caching, copy-on-write forks, swap.

Pure bookkeeping over block ids; the tensors live in the model runner. A block is full when it holds
`block_size` tokens; full blocks are keyed by a hash of (parent block's hash, their token ids), so two
requests with the same prefix share blocks. Blocks nobody references stay cached until evicted in
LRU order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from roofline.engine.request import Request


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Content hash of a full block: its tokens and everything before it (through the parent hash)."""
    h = hashlib.blake2b(parent_hash or b"", digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids))
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters since start-up."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens found in the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockPool:
    """Block ids with reference counts; free blocks kept in LRU order, cached ones findable by hash."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front evicts first
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free, or cached but unreferenced)."""
        return len(self.free)

    def allocate(self) -> int:
        """Take the least recently freed block, evicting its cached content."""
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        """Add a reference to a block (taking it off the free list if it was there)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """Drop a reference; an unreferenced block goes to the back of the free list, content kept."""
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def cache(self, block: int, block_hash: bytes) -> None:
        """Make a full block findable by its content hash."""
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash


class KVCacheManager:
    """Hands out KV blocks to requests and finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: dict[str, list[bytes]] = {}  # hashes of each request's full blocks, in order
        self.num_hashed_blocks: dict[str, int] = {}  # leading blocks of each table already registered in the cache
        self.swap_tables: dict[str, list[int]] = {}  # request -> CPU swap blocks holding its KV
        self.free_swap_blocks: list[int] = list(range(num_swap_blocks))[::-1]
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        """Total device blocks."""
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some request."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, request: Request) -> list[bytes]:
        hashes = self.block_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        while (len(hashes) + 1) * self.block_size <= len(tokens):
            start = len(hashes) * self.block_size
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[start:start + self.block_size]))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the longest prefix of the request's tokens (at least one token left to compute)."""
        if not self.enable_prefix_caching or request.skips_prefix_cache:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in self._full_block_hashes(request)[:max_blocks]:
            block = self.pool.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup in the hit rate (once: a lookup whose allocation failed is retried)."""
        if self.enable_prefix_caching and not request.skips_prefix_cache:
            self.stats.queried_tokens += request.num_tokens  # a resumed request looks up its output tokens too
            self.stats.hit_tokens += num_hit_tokens

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after taking `cached_blocks`); False if short."""
        table = self.block_tables.setdefault(request.request_id, [])
        cached_blocks = cached_blocks or []
        total = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(table) - len(cached_blocks)
        # cached blocks nobody references sit in the free list: taking them shrinks what is left to allocate
        num_reused_free = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if num_new_blocks > self.pool.num_free - num_reused_free:
            if not table:
                del self.block_tables[request.request_id]
            return False
        for block in cached_blocks:
            self.pool.touch(block)
        table.extend(cached_blocks)
        table.extend(self.pool.allocate() for _ in range(max(num_new_blocks, 0)))
        if self.enable_prefix_caching:
            num_full = min(total, request.num_tokens) // self.block_size
            hashes = self._full_block_hashes(request)
            for i in range(self.num_hashed_blocks.get(request.request_id, 0), num_full):
                self.pool.cache(table[i], hashes[i])
            self.num_hashed_blocks[request.request_id] = max(num_full, len(cached_blocks))
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so shared prefixes stay cached longest)."""
        for block in reversed(self.block_tables.pop(request.request_id, [])):
            self.pool.release(block)
        self.block_hashes.pop(request.request_id, None)
        self.num_hashed_blocks.pop(request.request_id, None)
        self.free_swap_blocks.extend(self.swap_tables.pop(request.request_id, []))

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Share the parent's blocks with a child (copy-on-write): full blocks by reference, the partial one copied.

        Returns (source, destination) of the block the runner must copy, or None. The caller must have
        checked that one free block is available.
        """
        table = self.block_tables[parent.request_id]
        num_full = parent.num_computed_tokens // self.block_size
        for block in table[:num_full]:
            self.pool.touch(block)
        child_table = table[:num_full]
        copy = None
        if len(table) > num_full:
            dst = self.pool.allocate()
            child_table.append(dst)
            copy = (table[num_full], dst)
        self.block_tables[child.request_id] = child_table
        return copy

    def can_swap_out(self, request: Request) -> bool:
        """True when the CPU swap space can hold the request's blocks."""
        return len(self.block_tables.get(request.request_id, [])) <= len(self.free_swap_blocks)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move the request's KV to CPU swap blocks; returns (device block, swap block) copies to make."""
        table = self.block_tables.pop(request.request_id)
        self.num_hashed_blocks.pop(request.request_id, None)
        swap = [self.free_swap_blocks.pop() for _ in table]
        self.swap_tables[request.request_id] = swap
        mapping = list(zip(table, swap))
        for block in reversed(table):
            self.pool.release(block)
        return mapping

    def can_swap_in(self, request: Request, num_new_tokens: int) -> bool:
        """True when the swapped KV and `num_new_tokens` more tokens all fit in free device blocks."""
        num_blocks = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        return max(num_blocks, len(self.swap_tables[request.request_id])) <= self.pool.num_free

    def swap_in(self, request: Request) -> list[tuple[int, int]] | None:
        """Bring swapped KV back to fresh device blocks; returns (swap block, device block) copies, None if short."""
        swap = self.swap_tables[request.request_id]
        if len(swap) > self.pool.num_free:
            return None
        table = [self.pool.allocate() for _ in swap]
        self.block_tables[request.request_id] = table
        del self.swap_tables[request.request_id]
        self.free_swap_blocks.extend(swap)
        return list(zip(swap, table))

    def slot(self, request_id: str, position: int) -> int:
        """Flat cache slot of the request's token at `position`."""
        return self.block_tables[request_id][position // self.block_size] * self.block_size \
            + position % self.block_size
