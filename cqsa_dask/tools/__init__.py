"""Tools around the engine: the ``cqsa`` command and ``verify``."""
