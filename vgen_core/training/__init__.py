"""Training inside one worker: the DeepSpeed config, LR schedule, the step loop, EMA, checkpoint
state and the resume arithmetic, the registered trainable models (tasks), and what makes a step
fast (``step``: fused AdamW, the non-finite-gradient guard, compile, activation checkpointing).
No Ray here: ``pipelines.stages.train`` runs this loop in each Ray Train worker and feeds it
batches from ``get_dataset_shard``."""

from .checkpoint import WorkerState, checkpoint_due
from .ema import EMA
from .loop import TrainConfig, deepspeed_config, lr_at, train_loop
from .step import FiniteGuard, checkpoint_blocks, compile_model, make_optimizer
from .tasks import TASKS, Task, get_task

__all__ = ["TrainConfig", "deepspeed_config", "lr_at", "train_loop", "TASKS", "Task", "get_task",
           "EMA", "WorkerState", "checkpoint_due", "FiniteGuard", "checkpoint_blocks",
           "compile_model", "make_optimizer"]
