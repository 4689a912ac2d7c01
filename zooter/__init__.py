"""Zooter: a reward-guided LLM router (ZOOTER, arXiv 2311.08692).

zooter.training  data contract, importers, tags, labels, training, evaluation
zooter.export    ONNX export, quantization, parity, bundle, Triton repository builder
zooter.runtime   the torch-free embeddable Router, benchmarks, Triton client and launcher
"""

__version__ = "0.1.0"
