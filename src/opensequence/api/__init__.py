"""HTTP layer: ``create_app(settings)`` wires routers, error handling, rate limits, metrics."""
