"""CLI subcommands, one module per stage; each module exposes ``register(app)``."""
