"""The base of every error that bad input from a user raises: reported in one line, without a traceback."""


class UserError(Exception):
    """A bad config, run, checkpoint, cache, image or argument; the message says what and how to fix it."""
