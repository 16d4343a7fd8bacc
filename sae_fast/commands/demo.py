"""`sae-fast demo` (placeholder until its issue lands)."""

HELP = "(not yet available)"
DESCRIPTION = HELP


def add_arguments(parser):
    pass


def run(args):
    from sae_fast.errors import UserError

    raise UserError("'demo' is not implemented yet")
