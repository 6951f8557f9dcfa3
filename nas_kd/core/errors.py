"""The one exception type for bad user input.

Everything that enters from outside (flags, budgets, YAML, checkpoints, storage URLs, datasets)
raises `InputError` with a message that names what was wrong and what is accepted. The command
line prints that message as one line and exits with status 2; nothing else is caught that way.
"""


class InputError(ValueError):
    """Bad input from the user; the message is shown to them as is."""
