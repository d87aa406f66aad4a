"""What a PEFT method is set up with (torch-free): the known methods and `PeftSettings`.

The `deft` and `ada_deft` passes fill `PeftSettings` from their recipe options
(`deftcompress.training.options.PeftOptions`); `wrapping` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deftcompress.core.selectors import kept_module_patterns

METHODS: tuple[str, ...] = ("lora", "qlora", "adapter", "prompt", "prefix", "ia3")
MERGEABLE: tuple[str, ...] = ("lora", "qlora", "ia3")  # adapters that fold into the weights
TARGETED: tuple[str, ...] = ("lora", "qlora", "ia3")  # methods that take target_modules


@dataclass(frozen=True)
class PeftSettings:
    method: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: from the architecture table
    target_mlp_up: bool = True  # default targets include the MLP up-projection(s)
    reduction_factor: int = 16
    num_virtual_tokens: int = 20
    adapter_name: str | None = None  # None: peft's "default" (saved at the folder's top) / "deft" for adapters
    quantize_skip: tuple[str, ...] = field(default_factory=lambda: tuple(kept_module_patterns()))  # selectors
