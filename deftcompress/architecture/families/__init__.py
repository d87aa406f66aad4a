"""One module per model family, each defining `FAMILIES`: the `ArchSpec` records it contributes."""
