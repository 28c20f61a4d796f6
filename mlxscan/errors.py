"""The one exception users see."""


class MlxscanError(ValueError):
    """Bad input or a state mlxscan cannot work with.

    The message is one line saying what is wrong and what to do; the CLI prints it and exits 2.
    """
