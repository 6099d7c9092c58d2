"""The one exception type that turns into a clean `Error:` paragraph and an exit code."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away (`| head`), as other Unix tools
EXIT_TERMINATED = 143  # 128 + SIGTERM: kill, schedulers, containers


class UserError(Exception):
    """Bad input or a failure the user can act on; the CLI prints it without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread the way Ctrl-C raises KeyboardInterrupt: every cleanup
    written for Ctrl-C (a run's resume point, batch-predict's .partial file, the decoding
    workers) then runs for it too; only the exit code (143) and the wording differ."""


def interruption(exc: BaseException) -> tuple[str, int]:
    """How an interruption is named to the user, and its exit code."""
    if isinstance(exc, Terminated):
        return "Terminated (SIGTERM)", EXIT_TERMINATED
    return "Interrupted", EXIT_INTERRUPTED
