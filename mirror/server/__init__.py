"""Server plumbing: the app and its lifecycle, middlewares, logs, metrics, limits, TLS, notifications."""
