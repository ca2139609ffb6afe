"""Conversational program synthesis, as the CodeGen paper proposes: the protocol that turns
natural-language turns into a program (shared with MTPB), where each turn's code comes from, execution
of the program so far, and the Session that users drive (from Python, `codegen-lm chat` and
`codegen-lm synthesize`)."""

from .execution import ProgramRunner, RunResult
from .guided import TurnResult, write_turn
from .protocol import HEADER, CutStream, cut_turn, instruction_comment
from .session import DEFAULT_PARAMS, Session, SessionFileError, Turn
from .writer import EngineWriter, FunctionWriter, PromptTooLong, derive_seed, writer_for

__all__ = ["DEFAULT_PARAMS", "HEADER", "CutStream", "EngineWriter", "FunctionWriter", "ProgramRunner",
           "PromptTooLong", "RunResult", "Session", "SessionFileError", "Turn", "TurnResult", "cut_turn",
           "derive_seed", "instruction_comment", "write_turn", "writer_for"]
