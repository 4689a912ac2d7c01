"""Zooter: a reward-guided LLM router (ZOOTER, arXiv 2311.08692).

zooter.runtime   the torch-free embeddable Router, the bundle and routing.json formats, the decision rule, candidate I/O
zooter.serving   the candidates file and the clients that call a candidate (OpenAI-compatible, Triton)
zooter.convert   ONNX export, quantization, the INT8 encoder
zooter.training  data contract, importers, tags, labels, training, evaluation
zooter.export    parity, bundle, Triton repository builder, Kubernetes writer
zooter.servers   the gateway and the tritonserver launcher
zooter.cli       the `zooter` command
"""

__version__ = "0.1.0"
