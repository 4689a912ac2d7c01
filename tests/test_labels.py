"""Label math on hand-computed examples: softmax over scored candidates, null masking, tag means
from training rows only, beta mixing, hard labels."""

import math

import numpy as np
import pytest

from zooter.training.labels import (entropy, enhance, hard_labels, reward_distribution, tag_distributions,
                                    training_targets)

NAN = float("nan")
E = math.e


def test_softmax_of_rewards_by_hand():
    s = reward_distribution(np.array([[1.0, 0.0, 0.0]]))
    assert s[0] == pytest.approx([E / (E + 2), 1 / (E + 2), 1 / (E + 2)])


def test_tau_sharpens():
    s = reward_distribution(np.array([[1.0, 0.0]]), tau=0.5)
    assert s[0] == pytest.approx([E**2 / (E**2 + 1), 1 / (E**2 + 1)])


def test_null_rewards_are_masked_not_zero():
    # With a null read as 0 the third candidate would get e^0 / (e + 2) mass; masked it gets none.
    s = reward_distribution(np.array([[1.0, 0.0, NAN]]))
    assert s[0] == pytest.approx([E / (E + 1), 1 / (E + 1), 0.0])
    assert s.sum() == pytest.approx(1.0)


def test_a_row_without_any_reward_is_an_error():
    with pytest.raises(ValueError):
        reward_distribution(np.array([[NAN, NAN]]))


def test_tag_means_and_beta_mixing_by_hand():
    dists = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    tags = [["a"], ["a", "b"], ["b"]]
    s_t = tag_distributions(dists, tags)
    assert s_t["a"] == pytest.approx([0.75, 0.25])
    assert s_t["b"] == pytest.approx([0.25, 0.75])
    mixed = enhance(dists, tags, s_t, beta=0.3)
    assert mixed[0] == pytest.approx([0.3 * 1.0 + 0.7 * 0.75, 0.3 * 0.0 + 0.7 * 0.25])
    # Row 1 has two tags: the mean of s_a and s_b is (0.5, 0.5).
    assert mixed[1] == pytest.approx([0.5, 0.5])
    assert mixed[2] == pytest.approx([0.3 * 0.0 + 0.7 * 0.25, 0.3 * 1.0 + 0.7 * 0.75])
    assert enhance(dists, tags, s_t, beta=1.0) == pytest.approx(dists)


def test_rows_with_unknown_or_no_tags_keep_their_distribution():
    dists = np.array([[0.9, 0.1], [0.2, 0.8]])
    s_t = {"a": np.array([0.5, 0.5])}
    mixed = enhance(dists, [[], ["zzz"]], s_t, beta=0.3)
    assert mixed == pytest.approx(dists)


def test_tag_means_come_from_the_training_rows_only(tmp_path):
    """The training targets' tag means use the training rows alone: dev rows carrying the same tag,
    whatever their rewards, change nothing (zooter.training.train.prepare, as `zooter train` runs it)."""
    from zooter.training.dataset import RoutingDataset, Row
    from zooter.training.train import TrainConfig, prepare

    train_rows = [Row("t1", "first training query", {"a": 1.0, "b": 0.0}, ["x"]),
                  Row("t2", "second training query", {"a": 0.0, "b": 1.0}, ["x"]),
                  Row("t3", "third training query", {"a": 0.2, "b": 0.4}, ["y"])]
    RoutingDataset(train_rows, ["a", "b"]).save(tmp_path / "train.jsonl")
    targets = {}
    for name, dev_reward in (("dev_a", 1.0), ("dev_b", 0.0)):
        dev_rows = [Row(f"d{i}", f"dev query {i}", {"a": dev_reward, "b": 1.0 - dev_reward}, ["x"]) for i in range(5)]
        RoutingDataset(dev_rows, ["a", "b"]).save(tmp_path / f"{name}.jsonl")
        cfg = TrainConfig(data=str(tmp_path / "train.jsonl"), dev=str(tmp_path / f"{name}.jsonl"), out=str(tmp_path / "run"),
                          backbone="unused", beta=0.0, tau=1.0)
        targets[name] = prepare(cfg).targets
    np.testing.assert_array_equal(targets["dev_a"], targets["dev_b"])
    # beta 0: each training row gets its tags' mean over the training rows carrying them.
    s = reward_distribution(np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.4]]))
    assert targets["dev_a"][0] == pytest.approx(s[:2].mean(0)) and targets["dev_a"][2] == pytest.approx(s[2])


def test_hard_labels_mask_nulls_and_break_ties_by_training_mean():
    r = np.array([[0.2, NAN, 0.9], [1.0, 1.0, 0.0], [NAN, 0.0, NAN]])
    h = hard_labels(r, tie_order=[0.1, 0.5, 0.3])
    assert h.tolist() == [[0, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert hard_labels(np.array([[1.0, 1.0]])).tolist() == [[1, 0]]


def test_hard_loss_targets_are_unmixed_one_hots():
    targets, s_t = training_targets(np.array([[0.0, 1.0], [1.0, 0.0]]), [["a"], ["a"]], beta=0.3, loss="hard")
    assert targets.tolist() == [[0, 1], [1, 0]]
    assert s_t == {}


def test_entropy():
    assert entropy(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])) == pytest.approx([math.log(2), 0.0])
