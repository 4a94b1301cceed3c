"""Rich progress bars for long steps (evaluation, demo).

A module of its own so that library code (the demo, the runner's callers) can show
progress without importing the CLI, which sits above them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def progress_factory() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Rich progress bars on stderr; each call adds one bar and returns its advance function."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as prog:
        def make(desc: str, total: int) -> Callable[[int], None]:
            task = prog.add_task(desc, total=total)
            return lambda k: prog.advance(task, k)

        yield make


def rich_training_progress(trainer: Any, description: str = "training") -> Any:
    """Replace the Trainer's tqdm bar (which also prints every log as a raw dict) with one rich
    bar per training stage showing the step, the running loss and the time left. Returns the trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_train_progress_callback(description))
    return trainer


def _train_progress_callback(description: str) -> Any:
    from transformers import TrainerCallback

    class RichTrainProgress(TrainerCallback):
        def __init__(self) -> None:
            self.prog: Any = None
            self.task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return  # one bar per job, not one per process
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self.task = self.prog.add_task(description, total=state.max_steps, completed=state.global_step, loss="—")
            self.prog.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prog is not None:
                self.prog.update(self.task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if self.prog is not None and logs and "loss" in logs:
                self.prog.update(self.task, loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prog is not None:
                self.prog.update(self.task, completed=state.global_step)
                self.prog.stop()
                self.prog = None

    return RichTrainProgress()
