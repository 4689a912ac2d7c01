"""The reward-model ranking baseline: picks by the second reward model, graded by the eval rewards, and its cost."""

from __future__ import annotations

import numpy as np
import pytest

from zooter.runtime.errors import UserError
from zooter.serving.candidates import Cost
from zooter.training.dataset import Row, RoutingDataset
from zooter.training.rmr import rmr_baseline


def dataset(rewards: dict[str, list], names=("a", "b", "c"), source="s") -> RoutingDataset:
    rows = [Row(rid, f"query {rid}", dict(zip(names, values)), source=source) for rid, values in rewards.items()]
    return RoutingDataset(rows, list(names))


def test_rmr_picks_by_second_model_and_is_graded_by_eval():
    eval_data = dataset({"q1": [0.9, 0.1, 0.5], "q2": [0.2, 0.8, 0.3], "q3": [0.4, 0.4, 1.0]})
    # The ranking model gets q1 and q3 right and q2 wrong (prefers c, worth 0.3).
    rmr_data = dataset({"q1": [3.0, -1.0, 0.0], "q2": [0.0, 1.0, 2.0], "q3": [0.0, 0.1, 5.0]})
    result = rmr_baseline(eval_data, rmr_data)
    assert result["mean_reward"] == pytest.approx((0.9 + 0.3 + 1.0) / 3)
    assert result["oracle_mean_reward_same_queries"] == pytest.approx((0.9 + 0.8 + 1.0) / 3)
    assert result["picks_oracle_best"] == pytest.approx(2 / 3)
    assert result["choices"] == {"a": 1, "b": 0, "c": 2}
    assert result["queries"] == 3 and result["by_source"] == {"s": pytest.approx(2.2 / 3)}
    cost = result["cost"]
    assert cost["rmr"]["generations_per_query"] == 3 and cost["rmr"]["reward_model_passes_per_query"] == 3
    assert cost["router"] == {"generations_per_query": 1, "router_passes_per_query": 1}


def test_rmr_with_the_eval_model_itself_is_the_oracle():
    eval_data = dataset({f"q{i}": list(np.random.default_rng(i).random(3)) for i in range(20)})
    result = rmr_baseline(eval_data, eval_data)
    assert result["mean_reward"] == pytest.approx(result["oracle_mean_reward_same_queries"]) and result["picks_oracle_best"] == 1.0


def test_rmr_missing_scores_and_unmatched_queries():
    eval_data = dataset({"q1": [0.9, None, 0.5], "q2": [0.2, 0.8, 0.3], "q4": [0.1, 0.2, 0.3]})
    rmr_data = dataset({"q1": [None, 9.0, 1.0], "q2": [1.0, None, None], "q3": [1.0, 0.0, 0.0]})
    result = rmr_baseline(eval_data, rmr_data, costs={"a": Cost(1, 3), "b": Cost(0.5, 0.5), "c": Cost(0, 0)})
    # q1: b ranks best but has no eval reward -> ungraded; q2: only a was ranked -> 0.2; q4 is not in the rmr file.
    assert result["mean_reward"] == pytest.approx(0.2) and result["queries"] == 1
    assert result["skipped"] == {"not_in_rmr_file": 1, "no_rmr_reward": 0, "pick_has_no_eval_reward": 1}
    assert result["cost"]["rmr"]["mean_answers_ranked"] == pytest.approx(1.5)
    assert result["mean_cost"] == pytest.approx(2.0 + 0.5 + 0.0)
    assert rmr_baseline(eval_data, rmr_data)["mean_cost"] is None
    with pytest.raises(UserError, match="no query id"):
        rmr_baseline(eval_data, dataset({"zz": [1.0, 0.0, 0.0]}))
