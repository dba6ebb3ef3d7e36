"""The one exception type users see: a single line naming the cause and where it happened."""


class AsftError(Exception):
    """A user-facing failure (bad path, bad file, bad config).

    The CLI prints ``asft: error: <message>`` and exits non-zero without a traceback, so the
    message must say what is wrong and name the offending file, key or record.
    """
