"""Agreement among the ranks of a ``torch.distributed`` job, bounded by a timeout.

Every rank posts its verdict (a :class:`Vote`) to the job's c10d store; rank 0 waits for all of
them, decides, and posts one decision that every other rank waits for. The store, not a process
group collective, carries the votes: it works under any backend (NCCL included), a wait on it
has its own timeout, and a rank that never answers is named instead of hanging everyone (a timed
out NCCL collective would leave the process group unusable). Traffic is O(ranks) per stage.

Every rank must take part in the same sequence of agreements (one per ``safe_load_adapter``
stage): the keys are numbered per process.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

__all__ = ["Collective", "Outcome", "Vote"]

DEFAULT_TIMEOUT = 600.0  # seconds; ranks may reach the load minutes apart (each reads its share of the base first)
_GRACE = 5.0  # followers wait this much longer than the coordinator, so they hear who was silent
_SESSIONS = itertools.count()
_MAX_LISTED = 8  # failing ranks carried in a decision


@dataclass(frozen=True)
class Vote:
    """One rank's verdict at one stage: ok or not, a fingerprint of what it loads, its findings."""

    rank: int
    ok: bool
    fingerprint: str = ""
    findings: tuple[dict[str, Any], ...] = ()  # Diagnosis.to_dict() of its first causes

    def to_json(self) -> bytes:
        data = {"rank": self.rank, "ok": self.ok, "fingerprint": self.fingerprint, "findings": list(self.findings)}
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Vote:
        data = json.loads(raw)
        return cls(int(data["rank"]), bool(data["ok"]), str(data["fingerprint"]), tuple(data["findings"]))


@dataclass(frozen=True)
class Outcome:
    """What the ranks agreed at one stage. ``ok`` only when every rank answered ok with the same fingerprint."""

    stage: str
    world_size: int
    ok: bool
    failed: tuple[Vote, ...] = ()  # the first failing ranks' votes, in rank order
    failed_count: int = 0
    silent: tuple[int, ...] = ()  # ranks that did not answer within the timeout
    disagreeing: tuple[int, ...] = ()  # ranks whose fingerprint differs from rank 0's
    timeout: float = DEFAULT_TIMEOUT
    waited: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "ok": self.ok,
                "failed": [json.loads(v.to_json()) for v in self.failed],
                "failed_count": self.failed_count,
                "silent": list(self.silent),
                "disagreeing": list(self.disagreeing),
            }
        ).encode()


@dataclass
class Collective:
    """The ranks of the default process group, agreeing through its store. Build with :meth:`for_job`."""

    store: Any
    rank: int
    world_size: int
    timeout: float = DEFAULT_TIMEOUT
    session: int = field(default_factory=lambda: next(_SESSIONS))
    grace: float = _GRACE

    @classmethod
    def for_job(cls, timeout: float | None = None) -> Collective | None:
        """The job's collective, or None outside an initialised multi-process ``torch.distributed`` job."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        from torch.distributed.distributed_c10d import _get_default_store

        seconds = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if seconds <= 0:
            raise ValueError(f"collective_timeout must be positive seconds, got {timeout!r}")
        return cls(_get_default_store(), dist.get_rank(), dist.get_world_size(), seconds)

    def _key(self, stage: str, who: str) -> str:
        return f"safe_peft/{self.session}/{stage}/{who}"

    def agree(self, stage: str, vote: Vote) -> Outcome:
        """Post ``vote`` and return the decision of all ranks (never raises on a silent rank: it says so)."""
        started = time.monotonic()
        self.store.set(self._key(stage, str(self.rank)), vote.to_json())
        if self.rank == 0:
            outcome = self._decide(stage)
            self.store.set(self._key(stage, "decision"), outcome.to_json())
        else:
            outcome = self._hear(stage)
        return _with_time(outcome, time.monotonic() - started)

    def _decide(self, stage: str) -> Outcome:
        keys = [self._key(stage, str(r)) for r in range(self.world_size)]
        silent: tuple[int, ...] = ()
        if not _wait(self.store, keys, self.timeout):
            silent = tuple(r for r, key in enumerate(keys) if not self.store.check([key]))
        present = [r for r in range(self.world_size) if r not in silent]
        votes = [Vote.from_json(raw) for raw in self.store.multi_get([keys[r] for r in present])]
        reference = votes[0].fingerprint if votes and votes[0].rank == 0 else None
        failed = [v for v in votes if not v.ok]
        disagreeing = tuple(v.rank for v in votes if v.ok and reference is not None and v.fingerprint != reference)
        ok = not silent and not failed and not disagreeing
        return Outcome(
            stage,
            self.world_size,
            ok,
            tuple(failed[:_MAX_LISTED]),
            len(failed),
            silent,
            disagreeing,
            self.timeout,
        )

    def _hear(self, stage: str) -> Outcome:
        key = self._key(stage, "decision")
        if not _wait(self.store, [key], self.timeout + max(self.grace, 0.1 * self.timeout)):
            return Outcome(stage, self.world_size, False, silent=(0,), timeout=self.timeout)
        data = json.loads(self.store.get(key))
        return Outcome(
            stage,
            self.world_size,
            bool(data["ok"]),
            tuple(Vote.from_json(json.dumps(v).encode()) for v in data["failed"]),
            int(data["failed_count"]),
            tuple(data["silent"]),
            tuple(data["disagreeing"]),
            self.timeout,
        )


def _wait(store: Any, keys: list[str], seconds: float) -> bool:
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except RuntimeError:  # DistStoreError: the wait timed out
        return False
    return True


def _with_time(outcome: Outcome, waited: float) -> Outcome:
    from dataclasses import replace

    return replace(outcome, waited=waited)
