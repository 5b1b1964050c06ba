"""TAID under DeepSpeed ZeRO-3 on 2 CPU processes: every rank holds the same t at every step."""

from __future__ import annotations

import json

import pytest
from distributed.launcher import launch_deepspeed_run

WORKER = "tests/distributed/taid_worker.py"


@pytest.mark.distributed
def test_t_is_identical_on_every_rank_under_zero3(tmp_path):
    launch_deepspeed_run(WORKER, tmp_path)
    ranks = [json.loads((tmp_path / f"taid_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["zero_stage"] == 3 for r in ranks)
    assert len(ranks[0]["ts"]) == 5
    assert ranks[0]["ts"] == ranks[1]["ts"]  # bit-identical, not merely close
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    ts = ranks[0]["ts"]
    assert ts[0] == 0.4 and all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > 0.4
