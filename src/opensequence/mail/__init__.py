"""Mail: Liquid templates, MIME messages and transports."""
