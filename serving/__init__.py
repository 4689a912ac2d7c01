"""Serving side: reaching served models and serving the router.

The candidates file (who the candidates are, what they cost, how to call them), clients for
candidate LLMs (OpenAI-compatible HTTP; Triton with TensorRT-LLM's LLM-API or ensemble I/O, mapped by
zooter.runtime.candidate_io), the Triton launcher, client and benchmark, and the OpenAI-compatible
gateway. Builds on zooter.runtime only;
training (answer collection) and export (the Triton repository builder) build on it.
"""
