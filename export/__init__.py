"""Export side: ONNX export, graph optimization, quantization, parity gates, the bundle, the Triton repository builder."""
