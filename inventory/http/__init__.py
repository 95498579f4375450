"""The HTTP layer: Starlette routes and handlers, msgspec schemas, ``/openapi.json``, and
what wraps every request (guards, limits, the request middleware, stream authentication).

Handlers parse, call the service layer and encode; imports the layers below, never ops.
"""
