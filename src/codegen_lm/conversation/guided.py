"""Writing one turn, optionally guided by execution: after the turn, run the program so far; when it
does not parse, raises or is killed, sample the turn again (up to `tries` attempts) and keep the first
attempt whose program runs, or the first attempt if none does.

Attempts are numbered, and each draws from its own seed (`derive_seed(seed, *keys, attempt)`), so
attempt 0 is the very turn an unguided conversation writes: guidance only ever replaces turns whose
program failed. A history that already fails is not guided (no new turn can make it run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine import GenerationParams
from . import protocol
from .execution import RunResult
from .writer import OnText, Writer, derive_seed

Check = Callable[[str], RunResult]


@dataclass(frozen=True)
class TurnResult:
    code: str
    attempts: int  # completions sampled for this turn
    run: RunResult | None = None  # the check of the kept attempt's program (None: not checked)


def write_turn(
    writer: Writer,
    history: Sequence[tuple[str, str]],
    instruction: str,
    params: GenerationParams,
    keys: Sequence[object] = (),
    *,
    header: str = protocol.HEADER,
    tries: int = 1,
    check: Check | None = None,
    history_ok: bool = True,
    first_attempt: int = 0,
    on_text: OnText | None = None,
    on_failed: Callable[[int, RunResult], None] | None = None,
) -> TurnResult:
    """The code for `instruction` after `history`. With check and tries > 1, execution-guided (see the
    module); on_failed(attempt, run) is told of each attempt whose program failed before the next."""
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    prompt = protocol.prompt(history, instruction, header)
    guided = check is not None and tries > 1 and history_ok
    first: TurnResult | None = None
    for attempt in range(first_attempt, first_attempt + (tries if guided else 1)):
        seeded = dataclasses.replace(params, seed=derive_seed(params.seed, *keys, attempt))
        code = writer.write(prompt, seeded, on_text)
        if not guided:
            return TurnResult(code, 1)
        run = check(protocol.program([*history, (instruction, code)], header))
        if run.ok:
            return TurnResult(code, attempt - first_attempt + 1, run)
        if first is None:
            first = TurnResult(code, tries, run)
        if on_failed is not None and attempt + 1 < first_attempt + tries:
            on_failed(attempt - first_attempt + 1, run)
    assert first is not None
    return first
