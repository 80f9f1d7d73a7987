"""The ranks' agreement (one process: ranks as threads over an in-memory store with real timeouts)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from safe_peft import AdapterLoadError, Cause, Diagnosis, LoadReport
from safe_peft._distributed.collective import Collective, Outcome, Vote
from safe_peft._distributed.load import _Where


class MemoryStore:
    """The part of c10d's Store the agreement uses: set / get / check / multi_get / wait with a timeout."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.changed:
            self.data[key] = value
            self.changed.notify_all()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[k] for k in keys]

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.check(keys), timeout.total_seconds()):
                raise RuntimeError(f"wait timeout after {timeout}")


def _run(votes: Mapping[int, Vote | None], world: int, timeout: float = 0.5) -> dict[int, Outcome]:
    """Every rank with a vote agrees (rank r absent from ``votes`` or None: it never answers)."""
    store, outcomes = MemoryStore(), {}

    def rank(r: int, vote: Vote) -> None:
        outcomes[r] = Collective(store, r, world, timeout, session=0, grace=0.2).agree("plan", vote)

    threads = [threading.Thread(target=rank, args=(r, v)) for r, v in votes.items() if v is not None]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def _finding(code: str = "zero3_empty_tensors") -> dict[str, Any]:
    return Diagnosis(Cause.CORRUPT_CHECKPOINT, code, "4 LoRA tensors are empty", fix="save again").to_dict()


def test_every_rank_ok_with_one_fingerprint_agrees() -> None:
    outcomes = _run({r: Vote(r, True, "same") for r in range(3)}, 3)
    assert sorted(outcomes) == [0, 1, 2] and all(o.ok for o in outcomes.values())


def test_one_failing_rank_fails_every_rank_with_its_findings() -> None:
    votes = {0: Vote(0, True, "a"), 1: Vote(1, False, "", (_finding(),)), 2: Vote(2, True, "a")}
    outcomes = _run(votes, 3)
    for outcome in outcomes.values():
        assert not outcome.ok and [v.rank for v in outcome.failed] == [1] and outcome.failed_count == 1
        assert outcome.failed[0].findings[0]["code"] == "zero3_empty_tensors"


def test_a_different_fingerprint_is_a_disagreement() -> None:
    outcomes = _run({0: Vote(0, True, "a"), 1: Vote(1, True, "b"), 2: Vote(2, True, "a")}, 3)
    assert all(o.disagreeing == (1,) and not o.ok for o in outcomes.values())


def test_a_silent_rank_is_named_after_the_timeout() -> None:
    started = time.monotonic()
    outcomes = _run({0: Vote(0, True, "a"), 1: Vote(1, True, "a"), 2: None}, 3, timeout=0.3)
    assert time.monotonic() - started < 5
    assert sorted(outcomes) == [0, 1]
    assert all(o.silent == (2,) and not o.ok for o in outcomes.values())


def test_a_silent_coordinator_is_named_by_the_others() -> None:
    outcomes = _run({1: Vote(1, True, "a")}, 2, timeout=0.1)  # the follower waits a grace longer than the timeout
    assert outcomes[1].silent == (0,) and not outcomes[1].ok


def test_the_joint_report_tags_each_cause_with_its_ranks() -> None:
    failed = tuple(Vote(r, False, "", (_finding(),)) for r in (1, 2))
    outcome = Outcome("plan", 4, False, failed, 2, silent=(3,), timeout=2.0)
    where = _Where(None, "adapter", "LlamaForCausalLM", "default")
    where.rank, where.world_size = 0, 4
    report = where.joint(outcome, None)
    assert [d.code for d in report.causes] == ["zero3_empty_tensors", "rank_timeout"]
    assert report.causes[0].message.startswith("ranks 1, 2 of 4: ") and report.causes[0].details["ranks"] == [1, 2]
    assert report.causes[1].cause is Cause.DISTRIBUTED and report.causes[1].details["ranks"] == [3]
    assert not report.ok and report.base_model_unchanged
    error = AdapterLoadError(report)
    assert "ranks 1, 2 of 4" in str(error) and "rank 3 of 4 did not reach" in str(error)


def test_without_a_job_there_is_no_collective() -> None:
    assert Collective.for_job() is None  # torch.distributed is not initialised in this process
    with pytest.raises(AdapterLoadError):
        _Where(None, "a", "M", "default").settle("plan", LoadReport(ok=False), "", None)
