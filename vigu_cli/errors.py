"""The one exception type vigu shows to users: one line naming the problem and the fix."""


class VigUError(Exception):
    """A problem with the user's input or environment. The CLI prints `error: <message>` and exits 1;
    the message names what is wrong and what to do about it, in one line."""
