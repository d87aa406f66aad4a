"""Fine-tuning: the training loop, the density losses, activation scales, process groups.

- `context`: `TrainingContext`, the narrow view of a run a training pass hands down (model, data, constraints,
  its folder), built from core's `PassState` in one place; training never sees the pipeline;
- `options`: the option groups a training pass shares (PEFT method, density loss, optimisation),
  torch-free so that recipes validate without torch;
- `deft_run`: DEFT training as the `deft` and `ada_deft` passes run it (wrap, train, fold, save);
- `block_gates`: ADA-DEFT's learned weight per MLP block, its budget and the skip decision;
- `loop`: `train` (AdamW, schedule, constraints after every step, keep-best, accelerate DDP);
- `density_loss`: the DEFT density loss as an extra loss of the loop;
- `activation_scale`: training the per-neuron scales that let DEFT reach exact zeros (how they live in a model:
  `architecture.activation_scale`);
- `distributed`: rank and world size under torchrun / accelerate.
"""
