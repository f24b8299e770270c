"""Errors users see: each names the file, line or config key at fault and how to fix it."""


class UserError(Exception):
    """A problem with the user's input (config, files, dataset), reported without a traceback."""


class ConfigError(UserError):
    """One or more config problems, reported together.

    `problems` is a list of (key, message) pairs; str() lists them all, one per line.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  {key}: {msg}" for key, msg in self.problems]
        super().__init__(f"{len(self.problems)} config problem(s):\n" + "\n".join(lines))


class MediaError(UserError):
    """A media or caption file that cannot be read; `path` names it."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")
