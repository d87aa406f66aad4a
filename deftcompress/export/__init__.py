"""Export for deployment: `onnx` (optimum's exporter, density outputs added to the graph)."""
