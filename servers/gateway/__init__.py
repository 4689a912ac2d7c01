"""zooter gateway, the OpenAI-compatible front door (docs/gateway.md).

    app        the HTTP application: endpoints, authentication, SIGHUP reloads, serve()
    backends   who picks the candidate (the Router in process, or Triton's `zooter` model) and the fallback
    upstreams  where a request goes: OpenAI-compatible servers, Triton models, Triton's `zooter` model
    requests   what a client may send, checked and turned into a Call
    http       the request-read deadline and the server's connection options
    health     /health's background check of the upstreams
    metrics    the Prometheus metrics

What the CLI and the tests use is exported here.
"""

from zooter.servers.gateway.app import GatewaySettings, create_app, gateway_server_options, load_api_keys, serve

__all__ = ["GatewaySettings", "create_app", "gateway_server_options", "load_api_keys", "serve"]
