"""The training data order: shuffled index batches from grain, checkpointable, any batch size."""

import grain
import numpy as np
import pytest

from idfuse_jax.train_lib import index_iterator


def _take(iterator, n: int) -> list[list[int]]:
    return [np.asarray(next(iterator)).tolist() for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_every_epoch_is_a_permutation_and_the_state_round_trips(batch_size):
    iterator = index_iterator(5, batch_size, seed=3, num_steps=20)
    first = _take(iterator, 7)
    state = iterator.get_state()
    rest = _take(iterator, 13)
    flat = [i for batch in first + rest for i in batch]
    assert all(len(b) == batch_size for b in first + rest)
    for epoch in range(len(flat) // 5):
        assert sorted(flat[5 * epoch : 5 * epoch + 5]) == [0, 1, 2, 3, 4]
    assert len(set(map(tuple, (flat[0:5], flat[5:10], flat[10:15])))) > 1  # reshuffled
    resumed = index_iterator(5, batch_size, seed=3, num_steps=20)
    resumed.set_state(state)
    assert _take(resumed, 13) == rest
    # More steps (a resumed run given a larger train.steps) continue the same sequence.
    longer = index_iterator(5, batch_size, seed=3, num_steps=50)
    assert _take(longer, 20) == first + rest


def test_order_equals_an_endless_repeat_for_batches_above_one():
    """Checkpoints written before the finite repeat resume with the same order."""
    endless = grain.MapDataset.range(6).seed(7).shuffle().repeat().batch(4)
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    expected = _take(iter(endless.to_iter_dataset(read)), 12)
    assert _take(index_iterator(6, 4, seed=7, num_steps=12), 12) == expected
