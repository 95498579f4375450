"""Boot and operations: the composition root (:mod:`.app`), the command line, embedded
servers, start-up checks, tracing, ``inventory check`` and the client-side commands.

The outermost layer: it may import every other one, and only entry points (the console
script, tests, benchmarks) import it.
"""
