"""Super-resolving images: the PyTorch and ONNX Runtime paths, tiling, `edsr-dist sr` and `export`."""
