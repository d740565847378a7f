"""The HTTP edge: routes, middleware, uploads, errors as JSON, the page and the docs."""
