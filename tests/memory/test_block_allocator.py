"""BlockAllocator: unit tests and a hypothesis state machine against a plain
Python model of the same rules (every result and the whole state compared
after every step, errors included)."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from torchkiln.memory import BlockAllocator, OutOfBlocks


def test_allocate_free_and_out_of_blocks():
    a = BlockAllocator(8, 4)
    first = a.allocate(5)
    assert sorted(first) == first and len(set(first)) == 5
    assert a.num_free == 3 and a.usage() == pytest.approx(5 / 8)
    with pytest.raises(OutOfBlocks) as err:
        a.allocate(4)
    assert (err.value.requested, err.value.free) == (4, 3)
    assert a.num_free == 3  # nothing changed
    a.free(first)
    assert a.num_free == 8 and all(a.ref_count(b) == 0 for b in first)
    assert a.allocate(0) == []


def test_constructor_bounds_and_lazy_token_store():
    for num_blocks, block_size in ((0, 16), (2**31, 16), (4, 0), (4, 2**31)):
        with pytest.raises(ValueError, match="must be in"):
            BlockAllocator(num_blocks, block_size)
    # The prefix cache's token store grows with what is committed, so the
    # largest block size costs nothing up front (it used to allocate
    # num_blocks x block_size tokens: 16 GiB here).
    a = BlockAllocator(2, 2**31 - 1)
    assert a.allocate(2) and a.num_free == 0
    # Committing blocks out of id order grows the store past each one.
    b = BlockAllocator(64, 4)
    ids = b.allocate(64)
    tokens = list(range(64 * 4))
    b.commit(ids[::-1], tokens)  # block 63 first
    b.free(ids)
    assert b.match_prefix(tokens) == ids[::-1]


def test_bad_frees_change_nothing():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(2)
    before = (a.free_order(), [a.ref_count(b) for b in range(4)])
    for bad in ([blocks[0], 7], [blocks[0], blocks[0]], [3], [-1]):
        with pytest.raises(ValueError):
            a.free(bad)
        assert (a.free_order(), [a.ref_count(b) for b in range(4)]) == before
    with pytest.raises(ValueError, match="out of range"):
        a.fork([9])
    with pytest.raises(ValueError, match="not allocated"):
        a.fork([3])
    with pytest.raises(ValueError, match="not allocated"):
        a.copy_on_write(3)


def test_fork_and_copy_on_write():
    a = BlockAllocator(4, 2)
    (b,) = a.allocate(1)
    assert a.copy_on_write(b) == (b, b)  # sole owner writes in place
    a.fork([b])
    assert a.ref_count(b) == 2
    src, dst = a.copy_on_write(b)
    assert src == b and dst != b and a.ref_count(b) == 1 and a.ref_count(dst) == 1
    a.allocate(2)
    a.fork([dst])
    with pytest.raises(OutOfBlocks):
        a.copy_on_write(dst)
    assert a.ref_count(dst) == 2


def test_prefix_caching_round_trip_and_extra_key():
    a = BlockAllocator(16, 4)
    tokens = list(range(10))  # two full blocks and a partial one
    blocks = a.allocate(3)
    a.commit(blocks, tokens)
    assert a.num_cached == 2
    a.free(blocks)
    assert a.match_prefix(tokens) == blocks[:2]
    assert a.match_prefix(tokens[:7]) == blocks[:1]
    assert a.match_prefix(tokens, extra_key="adapter-1") == []
    assert a.match_prefix([0, 1, 2, 99, 4, 5, 6, 7]) == []
    assert a.stats()["hits"] == 3
    a.reset_prefix_cache()
    assert a.num_cached == 0 and a.match_prefix(tokens) == []


def test_eviction_order_tail_first_and_uncached_first():
    a = BlockAllocator(6, 1)
    chain = a.allocate(3)
    a.commit(chain, [1, 2, 3])
    a.free(chain)
    # Three uncached blocks go first, then the cached chain tail to head.
    assert a.allocate(6) == [3, 4, 5, *reversed(chain)]
    assert a.stats()["evictions"] == 3 and a.num_cached == 0


def test_commit_rejects_conflicting_contents():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(2)
    a.commit(blocks, [1, 2, 3, 4])
    a.commit(blocks, [1, 2, 3, 4])  # idempotent
    with pytest.raises(ValueError, match="already registered with other contents"):
        a.commit(blocks, [1, 2, 9, 9])
    with pytest.raises(ValueError, match="3 full blocks of tokens but only 2 blocks"):
        a.commit(blocks, [1, 2, 3, 4, 5, 6])
    with pytest.raises(TypeError):
        a.match_prefix(["a", "b"])


class Model:
    """The allocator's rules in plain Python (O(n) where the C++ is O(1))."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.ref = [0] * num_blocks
        self.uncached = deque(range(num_blocks))
        self.cached = deque()  # least recently freed first
        self.key_of: dict[int, tuple] = {}
        self.block_of: dict[tuple, int] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def keys(self, tokens, extra):
        return [(extra, tuple(tokens[: (i + 1) * self.bs])) for i in range(len(tokens) // self.bs)]

    def allocate(self, n):
        if n > len(self.uncached) + len(self.cached):
            raise OutOfBlocks(n, len(self.uncached) + len(self.cached))
        out = []
        for _ in range(n):
            if self.uncached:
                b = self.uncached.popleft()
            else:
                b = self.cached.popleft()
                del self.block_of[self.key_of.pop(b)]
                self.stats["evictions"] += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks):
        for b in blocks:
            if not 0 <= b < len(self.ref) or blocks.count(b) > self.ref[b]:
                raise ValueError
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                (self.cached if b in self.key_of else self.uncached).append(b)

    def fork(self, blocks):
        if any(self.ref[b] == 0 for b in blocks):
            raise ValueError
        for b in blocks:
            self.ref[b] += 1

    def copy_on_write(self, b):
        if self.ref[b] == 1 and b in self.key_of:
            pass
        elif self.ref[b] == 1:
            return b, b
        (dst,) = self.allocate(1)
        self.free([b])
        return b, dst

    def match_prefix(self, tokens, extra):
        hit = []
        keys = self.keys(tokens, extra)
        for key in keys:
            if key not in self.block_of:
                break
            hit.append(self.block_of[key])
        for b in hit:
            if self.ref[b] == 0:
                self.cached.remove(b)
            self.ref[b] += 1
        self.stats["hits"] += len(hit)
        self.stats["misses"] += len(keys) - len(hit)
        return hit

    def commit(self, blocks, tokens, extra):
        keys = self.keys(tokens, extra)
        if len(keys) > len(blocks):
            raise ValueError
        for b, key in zip(blocks, keys):
            if self.ref[b] == 0 or self.key_of.get(b, key) != key:
                raise ValueError
        for b, key in zip(blocks, keys):
            if b in self.key_of or key in self.block_of:
                continue
            self.key_of[b], self.block_of[key] = key, b

    def reset(self):
        self.uncached.extend(self.cached)
        self.cached.clear()
        self.key_of.clear()
        self.block_of.clear()

    def free_order(self):
        return [*self.uncached, *self.cached]


TOKENS = st.lists(st.integers(0, 2), max_size=10)  # a tiny alphabet, so prefixes repeat
EXTRA = st.sampled_from([None, "lora-a"])


class AllocatorMachine(RuleBasedStateMachine):
    NUM_BLOCKS, BLOCK_SIZE = 10, 2

    def __init__(self):
        super().__init__()
        self.real = BlockAllocator(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.model = Model(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.held: list[list[int]] = []  # each entry holds one reference to each of its blocks

    FAILED = object()

    def both(self, name, *args):
        """Runs one operation on both; they must agree on the result or the
        error type. Returns the result, or FAILED."""
        real_fn = getattr(self.real, name)
        model_fn = getattr(self.model, {"reset_prefix_cache": "reset"}.get(name, name))
        try:
            expected = model_fn(*args)
        except (ValueError, OutOfBlocks) as e:
            with pytest.raises(type(e)):
                real_fn(*args)
            return self.FAILED
        got = real_fn(*args)
        assert got == expected or (name == "fork" and got == list(args[0]))
        return got

    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        got = self.both("allocate", n)
        if got is not self.FAILED:
            self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.both("free", self.held.pop(i % len(self.held)))

    @rule(blocks=st.lists(st.integers(-1, 11), max_size=3))
    def free_arbitrary(self, blocks):
        # Mostly invalid; when valid, take the references away from `held`.
        if self.both("free", blocks) is not self.FAILED:
            for b in blocks:
                for entry in self.held:
                    if b in entry:
                        entry.remove(b)
                        break

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        entry = self.held[i % len(self.held)]
        if self.both("fork", list(entry)) is not self.FAILED:
            self.held.append(list(entry))

    @precondition(lambda self: any(self.held))
    @rule(i=st.integers(0, 100), j=st.integers(0, 100))
    def copy_on_write(self, i, j):
        entry = [e for e in self.held if e][i % len([e for e in self.held if e])]
        k = j % len(entry)
        got = self.both("copy_on_write", entry[k])
        if got is not self.FAILED:
            entry[k] = got[1]

    @rule(tokens=TOKENS, extra=EXTRA)
    def match_prefix(self, tokens, extra):
        self.held.append(self.both("match_prefix", tokens, extra))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), tokens=TOKENS, extra=EXTRA)
    def commit(self, i, tokens, extra):
        self.both("commit", self.held[i % len(self.held)], tokens, extra)

    @rule()
    def reset_prefix_cache(self):
        self.both("reset_prefix_cache")

    @invariant()
    def same_state(self):
        assert [self.real.ref_count(b) for b in range(self.NUM_BLOCKS)] == self.model.ref
        assert self.real.free_order() == self.model.free_order()
        assert self.real.num_free == self.model.ref.count(0)
        assert self.real.num_cached == len(self.model.block_of)
        assert self.real.stats() == self.model.stats
        assert [self.real.is_cached(b) for b in range(self.NUM_BLOCKS)] == [
            b in self.model.key_of for b in range(self.NUM_BLOCKS)
        ]

    @invariant()
    def held_references_match_ref_counts(self):
        counts = [0] * self.NUM_BLOCKS
        for entry in self.held:
            for b in entry:
                counts[b] += 1
        assert counts == self.model.ref


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
