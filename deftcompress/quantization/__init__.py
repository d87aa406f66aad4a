"""Quantization backends.

- `torch_int8`: torch.ao dynamic int8 Linear layers (CPU) and their safetensors format;
- `bnb`: bitsandbytes 8-bit and 4-bit layers in memory (quantize, dequantize, recognise).
"""
