"""Every benchmark of zooter, above everything it times: the bundle against PyTorch (latency.py, with
baselines.py and plots.py), routing through Triton against in process (triton.py, with micro_batcher.py),
the python backend's own floor (triton_floor.py), the gateway against calling the upstream directly
(gateway.py, with openai_stub.py) and the GPU path (gpu_check.py). They share one report type (report.py).
"""
