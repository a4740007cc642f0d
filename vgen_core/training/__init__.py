"""Training inside one worker: the DeepSpeed config, LR schedule, the step loop, EMA, checkpoint
state and the resume arithmetic, and the registered trainable models (tasks). No Ray here:
``pipelines.stages.train`` runs this loop in each Ray Train worker and feeds it batches from
``get_dataset_shard``."""

from .checkpoint import WorkerState, checkpoint_due
from .ema import EMA
from .loop import TrainConfig, deepspeed_config, lr_at, train_loop
from .tasks import TASKS, Task, get_task

__all__ = ["TrainConfig", "deepspeed_config", "lr_at", "train_loop", "TASKS", "Task", "get_task",
           "EMA", "WorkerState", "checkpoint_due"]
