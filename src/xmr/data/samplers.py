"""Identity (P x K) sampler, DDP-aware.

For plain random sampling under DDP use torch's ``torch.utils.data.DistributedSampler`` (with
``set_epoch``); this module only adds what torch lacks: batches of P identities x K instances each.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from xmr.errors import ConfigError


def _identities(pids: Sequence[int | None]) -> list[int]:
    """The pids as ints: P x K batches need an identity for every record, so a pid of None is refused."""
    missing = [i for i, pid in enumerate(pids) if pid is None]
    if missing:
        raise ConfigError(
            f"IdentitySampler: {len(missing)} of {len(pids)} training records have no identity "
            f"(pid=None, first at index {missing[0]}); the identity (P x K) sampler needs one for every "
            "record: use data.sampler=random for data without identities"
        )
    return [int(pid) for pid in pids if pid is not None]  # all of them, None was refused above


class IdentitySampler(Sampler[int]):
    """Yields dataset indices whose consecutive runs of `batch_size` form P x K batches:
    P = batch_size // num_instances distinct identities, K = num_instances items of each.

    Use with ``DataLoader(batch_size=batch_size, sampler=...)``. Per epoch every identity is cut into
    chunks of K shuffled items (the remainder below K is left out; an identity with fewer than K items
    gives one chunk drawn with replacement). Batches pick P identities at random, weighted by how many
    chunks they have left, without replacement within a batch; when fewer than P identities still have
    chunks, fresh chunks of random other identities fill the batch. An epoch has
    floor(total chunks / P) batches, so ``len()`` is exact and known in advance.

    DDP: all ranks build the same batch list from (seed, epoch); rank r takes batches r, r + W, ...,
    truncated so every rank gets the same number of whole batches (disjoint positions).
    Call ``set_epoch(epoch)`` before each epoch for a new, deterministic order.

    Every record must have an identity: a pid of None (data without identities) raises ConfigError.
    """

    def __init__(
        self,
        pids: Sequence[int | None],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ConfigError(
                f"IdentitySampler: batch_size ({batch_size}) must be a positive multiple of "
                f"num_instances ({num_instances})"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"IdentitySampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        groups: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(_identities(pids)):
            groups[pid].append(i)
        self.groups = [groups[p] for p in sorted(groups)]
        self.batch_size, self.num_instances = batch_size, num_instances
        self.num_ids_per_batch = batch_size // num_instances
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        if len(self.groups) < self.num_ids_per_batch:
            raise ConfigError(
                f"IdentitySampler: {len(self.groups)} identities, fewer than the "
                f"{self.num_ids_per_batch} per batch (batch_size / num_instances)"
            )
        chunks = sum(max(1, len(g) // num_instances) for g in self.groups)
        self.batches_per_rank = chunks // self.num_ids_per_batch // world_size
        if self.batches_per_rank == 0:
            raise ConfigError(
                f"IdentitySampler: too few samples for one batch of {batch_size} per rank "
                f"on {world_size} rank(s)"
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose (deterministic) order the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def _chunk(self, group: list[int], g: torch.Generator) -> list[list[int]]:
        k = self.num_instances
        if len(group) < k:
            return [[group[int(j)] for j in torch.randint(len(group), (k,), generator=g)]]
        order = [group[int(j)] for j in torch.randperm(len(group), generator=g)]
        return [order[i : i + k] for i in range(0, len(order) - k + 1, k)]

    def _fresh(self, group: list[int], g: torch.Generator) -> list[int]:
        chunks = self._chunk(group, g)
        return chunks[int(torch.randint(len(chunks), (1,), generator=g))]

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch (before splitting across ranks)."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        chunks = [self._chunk(grp, g) for grp in self.groups]
        left = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
        p, out = self.num_ids_per_batch, []
        for _ in range(self.batches_per_rank * self.world_size):
            available = int((left > 0).sum())
            picked = (
                torch.multinomial(left, min(p, available), replacement=False, generator=g).tolist()
                if available
                else []
            )
            if len(picked) < p:  # top up with fresh chunks of other identities
                others = torch.ones(len(self.groups), dtype=torch.float64)
                others[picked] = 0
                extra = torch.multinomial(others, p - len(picked), replacement=False, generator=g).tolist()
            else:
                extra = []
            batch = []
            for i in picked:
                left[i] -= 1
                batch.extend(chunks[i][int(left[i])])
            for i in extra:
                batch.extend(self._fresh(self.groups[i], g))
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[int]:
        mine = self.batches()[self.rank :: self.world_size][: self.batches_per_rank]
        for batch in mine:
            yield from batch
