"""The preference stage under DeepSpeed ZeRO-3 on 2 CPU processes, with the teacher (the reference) sharded."""

from __future__ import annotations

import json

import pytest
from distributed.launcher import launch_deepspeed_run

WORKER = "tests/distributed/preference_worker.py"


@pytest.mark.distributed
def test_preference_distillation_with_a_zero3_sharded_teacher(tmp_path):
    launch_deepspeed_run(WORKER, tmp_path)
    ranks = [json.loads((tmp_path / f"preference_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["zero_stage"] == 3
        assert rank["teacher_engine"] == "DeepSpeedEngine"
        assert rank["teacher_partitioned"] == rank["teacher_parameters"] > 0
        assert rank["teacher_local_numel"] < rank["teacher_full_numel"] / 10  # held as shards, not in full
        # the sharded teacher scores the responses as the full teacher does
        assert rank["sharded_ref"] == pytest.approx(rank["full_ref"], rel=1e-5, abs=1e-5)
        assert len(rank["losses"]) == 8
    assert ranks[0]["first_input_ids"] != ranks[1]["first_input_ids"]  # data parallel: different micro-batches
    assert ranks[0]["losses"] == ranks[1]["losses"]  # logged losses are reduced over ranks
    # step 1's logged loss = the mean over ranks of each rank's first micro-batch loss, computed by hand
    by_hand = (ranks[0]["first_loss_by_hand"] + ranks[1]["first_loss_by_hand"]) / 2
    assert ranks[0]["losses"][0] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    margins = ranks[0]["margins"]
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3
