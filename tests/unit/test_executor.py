"""Job stages' actor pools come from the executor: one batch of CPU work runs in the driver's
process (an actor pool's start-up costs more than the call); more work, or GPU work, goes to Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.dag.ray_exec import RayDataExecutor
from pipelines.dag.spec import ResourcesSpec
from pipelines.stages.base import InProcessExecutor


class _Double:
    made = 0

    def __init__(self, k: int):
        type(self).made += 1
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"x": [v * self.k for v in batch["x"].to_pylist()]})


def _no_ray():
    raise AssertionError("a one-batch CPU job must not build a Ray dataset")


def test_one_cpu_batch_runs_in_process_and_equals_the_in_process_executor():
    batches = [pa.table({"x": [1, 2, 3]})]
    kw = dict(make_ds=_no_ray, local_batches=lambda: iter(batches), batch_size=8)
    ray_side = list(RayDataExecutor({"CPU": 2.0, "GPU": 0.0}).map_actors(
        _Double, (2,), resources=ResourcesSpec(), num_batches=1, **kw))
    local = list(InProcessExecutor().map_actors(_Double, (2,), **kw))
    assert [t.to_pylist() for t in ray_side] == [t.to_pylist() for t in local] == \
        [[{"x": 2}, {"x": 4}, {"x": 6}]]


@pytest.mark.parametrize("num_batches,gpus", [(2, 0.0), (None, 0.0), (1, 1.0)])
def test_larger_unknown_or_gpu_work_goes_to_ray(num_batches, gpus):
    class _Built(Exception):
        pass

    def make_ds():
        raise _Built

    with pytest.raises(_Built):
        list(RayDataExecutor({"CPU": 2.0, "GPU": 1.0}).map_actors(
            _Double, (2,), make_ds=make_ds, local_batches=lambda: iter([]), batch_size=8,
            resources=ResourcesSpec(gpus=gpus), num_batches=num_batches))
