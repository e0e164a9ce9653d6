"""CLI subcommands, one module per stage; each module exposes ``register(app)``.

The modules import only typer, rich and kacli.commands._common at the top; each command imports the
library it calls when it runs, so that ``kacli --help`` does not load torch.
"""
