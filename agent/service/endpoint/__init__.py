"""The KServe v2 (open inference protocol) endpoint: the pipelines' models served over HTTP.

Off by default (profile section `endpoint`). The daemon hands in two callables, like the status page's:

    endpoint = InferenceEndpoint(profile.endpoint, models=served_models, ready=why_not_ready, environ=os.environ)
    endpoint.start()    # raises EndpointError when the address, token or TLS files are unusable
    ...
    endpoint.stop()

- `models()` -> {model name: the pipelines' current Model}: requests run in its shared session.
- `ready()` -> None when ready, otherwise the reason `/v2/health/ready` answers 503 with.

Import from the modules (the status page's metrics read stats.py without the server): server.py (HTTP,
auth, limits), routes.py (the protocol's routes), tensors.py (JSON and binary tensors), stats.py (what
`/metrics` shows).
"""
