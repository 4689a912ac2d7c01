"""Export side: the bundle (ONNX export and quantization from zooter.convert, parity gates), the Triton repository builder and reload, the Kubernetes writer."""
