"""Operations: metrics, JSON logs and request ids, health routes, graceful shutdown, and Redis
clients for every deployment shape.

Wiring, in ``create_app(settings)``::

    install_ops(app, settings)        # app.ops.install; after the other middlewares

and in the lifespan::

    token = bind_metrics(app.state.metrics)   # before starting background tasks
    ...
    await app.state.inflight.drain(settings.shutdown_grace_s)   # on shutdown, before closing

The package itself imports nothing, so low layers (metering) can use :mod:`app.ops.metrics`
without importing the routes that read metering state.
"""
