"""Models: demo training, ONNX export, the registry, deployment state, model worker, log bin."""
