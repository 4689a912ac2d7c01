"""The processes that listen: the OpenAI-compatible gateway (zooter.servers.gateway, `zooter gateway`) and the
tritonserver launcher (zooter.servers.tritonserver, `zooter serve`).

The top serving layer: builds on zooter.runtime, the client core in zooter.serving and the rest below it;
only the CLI (and the benches) build on it, so nothing that training or export needs lives here.
"""
