"""Conversion of a PyTorch router for inference: ONNX export (onnx_export.py), graph optimization and
INT8/fp16 quantization (quantize.py, with the Int8Recipe), and the INT8 encoder that quantization-aware
training embeds with (int8_encoder.py).

Between serving and training: training imports it to build the INT8 encoder exactly as export will,
and export builds bundles with it; it builds on zooter.runtime only.
"""
