"""Normalizer statistics against numpy, normalisation modes, and the registry."""

import numpy as np
import paddle
import pytest

from ppo.models.normalizer import (
    NORMALIZERS,
    ExponentialMovingAverage,
    RunningMeanStd,
    build_normalizer,
)


def _batches(dim, sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=3.0, scale=2.0, size=(size, dim)) for size in sizes]


@pytest.mark.parametrize("dim", [1, 3])
def test_running_mean_std_matches_numpy_over_all_batches(dim):
    normalizer = RunningMeanStd(dim=dim)
    batches = _batches(dim, [4, 1, 7, 2, 9])
    for i, batch in enumerate(batches):
        # Mix input kinds: numpy arrays and paddle tensors.
        normalizer.update(paddle.to_tensor(batch, dtype="float32") if i % 2 else batch)
        seen = np.concatenate(batches[: i + 1]).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(normalizer.mean, seen.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(normalizer.var, seen.var(axis=0), rtol=1e-5, atol=1e-6)
        assert normalizer.count == len(seen)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_exponential_moving_average_matches_numpy_recurrence(momentum):
    normalizer = ExponentialMovingAverage(dim=2, momentum=momentum)
    expected_mean = expected_var = None
    count = 0
    for batch in _batches(2, [5, 3, 8, 1]):
        normalizer.update(batch)
        if expected_mean is None:
            expected_mean, expected_var = batch.mean(0), batch.var(0)
        else:
            expected_mean = momentum * expected_mean + (1 - momentum) * batch.mean(0)
            expected_var = momentum * expected_var + (1 - momentum) * batch.var(0)
        count += len(batch)
        np.testing.assert_allclose(normalizer.mean, expected_mean, rtol=1e-12)
        np.testing.assert_allclose(normalizer.var, expected_var, rtol=1e-12)
        assert normalizer.count == count


def test_one_dimensional_scores_are_accepted_for_dim_one():
    normalizer = RunningMeanStd(dim=1)
    normalizer.update(np.array([1.0, 2.0, 6.0]))
    np.testing.assert_allclose(normalizer.mean, [3.0])
    np.testing.assert_allclose(normalizer.var, [np.var([1.0, 2.0, 6.0])])


def test_wrong_score_shape_is_rejected():
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        RunningMeanStd(dim=2).update(np.zeros((4, 3)))


def test_normalize_modes():
    normalizer = RunningMeanStd(dim=1)
    normalizer.update(np.array([[1.0], [3.0], [8.0]]))
    mean, std = normalizer.mean[0], np.sqrt(normalizer.var[0] + normalizer.epsilon)
    scores = paddle.to_tensor([[2.0], [-1.0]])
    np.testing.assert_allclose(normalizer.normalize(scores, "affine").numpy(), (scores.numpy() - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(normalizer.normalize(scores, "scale").numpy(), scores.numpy() / std, rtol=1e-6)
    np.testing.assert_array_equal(normalizer.normalize(scores, "identity").numpy(), scores.numpy())
    with pytest.raises(ValueError, match="allowed"):
        normalizer.normalize(scores, "whiten")


def test_state_dict_round_trip_and_dimension_check():
    source = ExponentialMovingAverage(dim=2)
    source.update(np.array([[1.0, 2.0], [3.0, 5.0]]))
    target = ExponentialMovingAverage(dim=2)
    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(target.mean, source.mean)
    np.testing.assert_array_equal(target.var, source.var)
    assert target.count == source.count == 2
    with pytest.raises(ValueError, match="expected 3"):
        RunningMeanStd(dim=3).load_state_dict(source.state_dict())


def test_registry_by_name_and_error_lists_names():
    assert set(NORMALIZERS) == {"RunningMeanStd", "ExponentialMovingAverage"}
    built = build_normalizer("ExponentialMovingAverage", dim=2, momentum=0.7)
    assert isinstance(built, ExponentialMovingAverage) and built.momentum == 0.7 and built.dim == 2
    with pytest.raises(ValueError, match="ExponentialMovingAverage.*RunningMeanStd"):
        build_normalizer("BatchNorm")
