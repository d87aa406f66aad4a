"""`TrainingContext`: what training reads of a run, and nothing else.

Training sits below the pipeline, so it never sees the pipeline's state. A pass builds the context
from its state in one call and hands it to `training.loop.train` or `training.deft_run.run_deft`:

    ctx = TrainingContext.from_state(state, self.name)
    result = run_deft(ctx, self.config)
    state.model = result.model          # training returns the model it made; the pass hands it on

The context shares the state's tokenizer and its list of constraints (a temporary constraint added
here binds this training, as it would on the state); its model is the one the pass started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from deftcompress.core.protocol import HoldsConstraints

if TYPE_CHECKING:
    from deftcompress.core.protocol import Constraint, PassState


@dataclass
class TrainingContext(HoldsConstraints):
    """The model, tokenizer, task, data, constraints and device of one training pass, and the run facts it reports."""

    model: Any  # the model as the pass received it
    tokenizer: Any
    task: Any  # deftcompress.data.tasks.TaskSpec
    arch: Any  # deftcompress.architecture.ArchSpec
    device: Any  # torch.device
    seed: int
    quiet: bool  # no progress bars
    constraints: list["Constraint"]  # the state's own list: what earlier passes promised
    train_examples: Callable[[int | None], list[dict]]  # seeded rows of the train split (at most n)
    eval_examples: Callable[[], list[dict]]  # the recipe's evaluation rows
    eval_settings: Any  # the recipe's deftcompress.measurement.evaluation.EvalSettings
    density_mode: str  # the recipe's, for options that leave it unset
    max_seq_length: int
    trust_pickle: bool  # teachers may be pickle-only checkpoints only when the run allows it
    pass_name: str
    pass_dir: Path  # this pass's folder (exists)
    run_dir: Path  # the run's folder: report paths are relative to it
    model_ref: str  # the recipe's model
    earlier_passes: tuple[str, ...]  # passes before this one that changed the model
    step_checkpoints: Any = None  # training.step_checkpoint.StepCheckpointStore of this pass, or None

    @classmethod
    def from_state(cls, state: "PassState", pass_name: str) -> "TrainingContext":
        earlier = tuple(p.name for p in state.recipe.plan[:max(state.step_index - 1, 0)] if p.cls.changes_model)
        return cls(model=state.model, tokenizer=state.tokenizer, task=state.task, arch=state.arch,
                   device=state.device, seed=state.seed, quiet=state.quiet, constraints=state.constraints,
                   train_examples=lambda n=None: state.examples("train", n), eval_examples=state.eval_examples,
                   eval_settings=state.eval_settings(), density_mode=state.recipe.density_mode,
                   max_seq_length=state.recipe.max_seq_length, trust_pickle=state.recipe.trust_pickle,
                   pass_name=pass_name, pass_dir=state.pass_dir(pass_name), run_dir=Path(state.work_dir),
                   model_ref=state.recipe.model, earlier_passes=earlier,
                   step_checkpoints=state.step_checkpoints)

    def relative(self, path: Path) -> str:
        """`path` as the report names it: relative to the run's folder."""
        return str(path.relative_to(self.run_dir))
