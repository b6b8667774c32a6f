"""Thin Ray Serve deployments wrapping the `serve_app` core."""
