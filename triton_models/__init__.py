"""Triton model repository templates, filled by `zooter triton build`."""
