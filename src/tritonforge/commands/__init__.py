"""CLI verbs by area. Each module has ``register(app)``; :mod:`tritonforge.cli` lists them in ``AREAS``."""
