"""The `Pass` protocol, the `Constraint` a pass leaves for later ones, and the facts a plan tracks.

A pass is a class with a `name`, a `Config` dataclass (its documented options) and a `run` method
that changes `state.model` and returns what it really did. Passes never import each other:

- what a pass leaves on the model for later passes (an adapter, quantized weights, a mask of
  zeroed weights) it declares with `leaves(config)`; what it cannot follow, with `needs(config)`.
  `deftcompress.core.plan` checks every plan against these declarations before any model loads;
- a promise that binds later passes at run time (a pruning mask that training has to keep) is a
  `Constraint` left in `state.constraints`, which training passes honour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from deftcompress.core.config import PassConfig

# Facts about the model that passes leave behind and later passes depend on.
ADAPTER = "adapter"  # an unmerged PEFT adapter wraps the model
QUANTIZED = "quantized"  # quantized weights (int8 / 4-bit): nothing may train, prune or quantize after
TORCH_INT8 = "torch_int8"  # torch.ao int8 layers: not exportable to ONNX
ZERO_MASK = "zero_mask"  # a mask of zeroed weights that later passes keep
ONNX_GRAPH = "onnx_graph"  # an exported ONNX graph
SCALES_IN_WEIGHTS = "scales_in_weights"  # DEFT's per-neuron scales folded into the weights (a spread int8 cannot hold)
FACTS = {
    ADAPTER: "an unmerged PEFT adapter on the model",
    QUANTIZED: "quantized weights",
    TORCH_INT8: "torch.ao int8 layers",
    ZERO_MASK: "a mask of zeroed weights that later passes keep",
    ONNX_GRAPH: "an exported ONNX graph",
    SCALES_IN_WEIGHTS: "activation scales folded into the weights",
}


@dataclass(frozen=True)
class Need:
    """A condition on the facts left by earlier passes.

    `present=False`: no earlier pass may leave `fact`; `present=True`: one must. `message` is the
    error, formatted with {here} (this pass), {earlier} (the pass that left the fact) and {note}
    (what that pass said about it).
    """

    fact: str
    present: bool
    message: str


@dataclass
class PlannedPass:
    """A pass as written in a recipe: its name, its validated config and its class."""

    name: str
    config: Any
    cls: type["Pass"]
    where: str  # location for error messages, e.g. "recipe.yaml: passes[1].deft"


class PassState(Protocol):
    """What a pass sees and changes: the model and what travels with it through a run.

    `deftcompress.pipeline.state.PipelineState` is the implementation; core names only what passes use,
    so the vocabulary of passes does not depend on the pipeline that runs them.
    """

    recipe: Any  # the run's recipe (settings: model, task, seed, evaluation options)
    task: Any  # deftcompress.data.tasks.TaskSpec
    arch: Any  # deftcompress.architecture.ArchSpec of the model's family
    model: Any  # the torch model a pass changes or replaces
    tokenizer: Any
    device: Any  # torch.device
    quiet: bool  # no progress bars
    constraints: list["Constraint"]  # promises of earlier passes that bind this one
    onnx: Any  # the exported graph once an export pass ran
    work_dir: Path  # the run's folder; reports name a pass's files relative to it
    step_index: int  # this pass's step in the plan (1 = the first pass)
    step_checkpoints: Any  # where a training pass keeps step checkpoints (training.step_checkpoint.StepCheckpointStore)

    @property
    def seed(self) -> int: ...

    def examples(self, split: str, max_samples: int | None = None) -> list[dict]: ...

    def eval_examples(self) -> list[dict]: ...

    def eval_settings(self) -> Any: ...

    def pass_dir(self, name: str) -> Path: ...


class Pass:
    """Base class of every pass.

    Class attributes:
      name          the key used in recipes
      Config        dataclass of options (subclass of PassConfig; each field has a help text)
      trains        True if the pass updates weights by gradient descent
      changes_model False for passes that only measure (the pipeline then reuses the last evaluation)
      summary       one line for `deftcompress passes`

    A pass's details may hold "warnings": a list of sentences about options that did nothing; the
    pipeline prints them and the report keeps them.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = PassConfig
    trains: ClassVar[bool] = False
    changes_model: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def label(cls, config: Any) -> str:
        """A few characters naming what this pass did, for one-line recipe summaries (`prune30 > deft(lora) > int8`)."""
        return cls.name

    @classmethod
    def leaves(cls, config: Any) -> dict[str, str]:
        """Facts this pass leaves for later passes, each with a note for error messages."""
        return {}

    @classmethod
    def needs_train_data(cls, config: Any) -> bool:
        """True if the pass reads the task's training split (validation then checks that it exists)."""
        return cls.trains

    @classmethod
    def needs(cls, config: Any) -> list[Need]:
        """Conditions on what earlier passes left. By default a pass that changes the model cannot follow quantization."""
        if not cls.changes_model:
            return []
        return [Need(QUANTIZED, False, "{here}: {earlier} must come after every pass that changes the model")]

    @classmethod
    def task_problem(cls, config: Any, task: Any) -> str | None:
        """What is wrong with this config for the recipe's task (a `data.tasks.TaskSpec`), or None."""
        return None

    def eval_settings(self, base: Any) -> Any:
        """Evaluation settings for the measurement after this pass (default: the recipe's)."""
        return base

    def run(self, state: PassState) -> dict[str, Any]:
        """Apply the pass to `state.model` (replace it if needed); return details for the report."""
        raise NotImplementedError


class Constraint:
    """A promise a pass leaves for later passes (e.g. 'these weights stay zero').

    Training passes call `bind` once the trainable model is built, `enforce` after every optimizer
    step, and `release` when they hand the model on. `state_tensors` / `from_state` let the pipeline
    save the constraint with the model after each pass (resumable runs).
    """

    name: ClassVar[str] = "constraint"

    def bind(self, model) -> None:
        pass

    def enforce(self, model) -> None:
        pass

    def release(self, model) -> None:
        pass

    def forget_modules(self, names: list[str]) -> None:
        """A pass removed these modules (full names, possibly with a wrapper's prefix) from the model."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def state_tensors(self) -> dict[str, Any]:
        """Tensors that rebuild this constraint (saved as safetensors); {} for a constraint that cannot be saved."""
        return {}

    @classmethod
    def from_state(cls, tensors: dict[str, Any]) -> "Constraint":
        raise NotImplementedError(f"{cls.__name__} cannot be restored from saved tensors")


class HoldsConstraints:
    """Binding, enforcing and releasing the `constraints` list of whatever holds it (the pipeline's state, the
    context a training pass hands down): one implementation for both."""

    constraints: list[Constraint]

    def bind_constraints(self, model) -> None:
        for c in self.constraints:
            c.bind(model)

    def enforce_constraints(self, model) -> None:
        for c in self.constraints:
            c.enforce(model)

    def release_constraints(self, model) -> None:
        for c in self.constraints:
            c.release(model)

    def forget_modules(self, names: list[str]) -> None:
        """A pass removed these modules (full names): constraints drop what they kept about them."""
        for c in self.constraints:
            c.forget_modules(names)
