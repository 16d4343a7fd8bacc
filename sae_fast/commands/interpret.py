"""`sae-fast interpret` (placeholder until its issue lands)."""

HELP = "(not yet available)"
DESCRIPTION = HELP


def add_arguments(parser):
    pass


def run(args):
    from sae_fast.errors import UserError

    raise UserError("'interpret' is not implemented yet")
