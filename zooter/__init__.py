"""Zooter: a reward-guided LLM router (ZOOTER, arXiv 2311.08692).

zooter.training  data contract, importers, tags, labels, training, evaluation
zooter.export    ONNX export, quantization, parity, bundle, Triton repository builder
zooter.runtime   the torch-free embeddable Router, the bundle and routing.json formats, the decision rule
zooter.serving   the candidates file and the clients that call a candidate (OpenAI-compatible, Triton)
"""

__version__ = "0.1.0"
