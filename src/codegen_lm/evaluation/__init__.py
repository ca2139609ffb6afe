"""Functional-correctness evaluation: a sandbox that runs untrusted generated programs."""

from .sandbox import DEFAULT_PRELOAD, ExecutionResult, Sandbox, run_program, run_programs

__all__ = ["DEFAULT_PRELOAD", "ExecutionResult", "Sandbox", "run_program", "run_programs"]
