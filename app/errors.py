"""The one exception type a user sees as a single clear line (no traceback)."""


class UserError(Exception):
    """Something the user can fix: a bad path, a corrupt file, a prompt too long, no network..."""
