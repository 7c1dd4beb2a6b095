"""SegQuant Serve: the HTTP service over ``segquant_core`` (FastAPI, Redis Streams job queue, model workers).

Layers, imports pointing down only::

    service.api      FastAPI routers, schemas, error envelope, middleware   (no torch)
    service.jobs     job model, queue protocol, Redis and in-process queues  (no torch, no HTTP)
    service.worker   engine (segquant_core public API), batching, runner    (no HTTP)
    service.registry / service.settings / service.metrics                   (shared, no torch)

See ``docs/service.md`` for the queue layout, routing, batching and metrics.
"""

__version__ = "0.1.0"
