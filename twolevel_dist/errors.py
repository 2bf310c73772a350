"""The project's user-facing errors: raised early, naming the problem and the fix. The entry
points print them as one ``error: ...`` line and exit with code 2."""


class ConfigError(ValueError):
    """A bad argument or configuration value. The message says what is wrong and how to fix it."""


class RunError(RuntimeError):
    """The run cannot go on (it diverged, the disk is full, a peer rank hung): the message names
    the cause and what to do; nothing incomplete was left marked complete."""


class RankError(RunError):
    """A failure that only this rank meets (at startup it found no rank 0 of its job): said at
    once, where an error every rank meets is left to rank 0 to say."""


class DataError(ValueError):
    """A data set is missing, malformed, or asked for with inconsistent options: the message
    names the path, the expected layout or the config key to change."""


class RunStopped(Exception):
    """A stop signal (a time limit, a preemption, Ctrl-C) ended the run at a step boundary with
    a complete checkpoint; the entry point exits with ``engine.stop.EXIT_STOPPED``."""

    def __init__(self, signal_number: int, signal_name: str, step: int, checkpoint):
        self.signal_number, self.signal_name = signal_number, signal_name
        self.step, self.checkpoint = step, checkpoint
        run_dir = checkpoint.parent.parent
        super().__init__(f"{signal_name} at step {step}: checkpoint {checkpoint} is complete; "
                         f"continue with the same command and resume=auto run_dir={run_dir} "
                         f"(exit code 75: stopped, resumable)")
