"""User-facing errors and the exit codes every step and command shares.

Exit codes are part of the step contract (DESIGN.md): Argo retries only 75.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where it is, what is wrong, what to do."""

    path: str
    message: str
    fix: str = ""

    def render(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class BadInput(Exception):
    """Input the user must change (spec, data, credentials). Never retried; exit 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        super().__init__("; ".join(p.render() for p in problems))

    def render(self) -> str:
        return "\n".join(f"error: {p.render()}" for p in self.problems)


class Transient(Exception):
    """A fault that may pass (network, registry, preemption). Argo retries exit 75."""

    exit_code = EXIT_TRANSIENT
