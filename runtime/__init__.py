"""Runtime side: the embeddable Router (numpy, onnxruntime, tokenizers; never torch or transformers),
the serving half of the CLI, latency benchmarks, the Triton client and launcher."""
