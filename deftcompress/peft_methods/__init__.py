"""PEFT methods through their real libraries (peft, adapters, bitsandbytes for QLoRA).

- `wrapping`: freezing a model and adding a method's trainable parameters; merging;
- `saving`: an adapter in its library's own format, and loading it back onto a base model.
"""
