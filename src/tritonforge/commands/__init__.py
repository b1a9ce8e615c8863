"""CLI verbs by area. Each module has ``register(app)``; :mod:`tritonforge.cli` lists them in ``AREAS``."""

__all__: list[str] = []  # the verbs are reached through tritonforge.cli, not imported
