"""The HTTP transport: REST routes, the middleware at the door, uploads, errors as JSON, the
page and the docs."""
