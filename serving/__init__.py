"""Serving side, the low layer: reaching served models.

The candidates file (who the candidates are, what they cost, how to call them), clients for
candidate LLMs (OpenAI-compatible HTTP; Triton with TensorRT-LLM's LLM-API or ensemble I/O, mapped by
zooter.runtime.candidate_io) and the Triton client (routing and answers through a tritonserver, model
control, the restricted-API constants the launcher and `zooter deploy` share). Builds on zooter.runtime only; training (answer
collection), export (the Triton repository builder, deploy) and the servers (zooter.servers: the gateway
and the tritonserver launcher) build on it.
"""
