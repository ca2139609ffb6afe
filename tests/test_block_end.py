"""`codegen-lm generate` ends a completion where the block its prompt started ends (block_end.py)."""

from __future__ import annotations

import ast

import pytest
import torch

from codegen_lm.block_end import BlockEnd
from codegen_lm.cli import main

from .conftest import scripted_checkpoint

FIB = "\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"

CASES = [
    # a header opens a block: it ends at the first line back at the header's column
    ("def fibonacci(n):", FIB + "\n\n\ndef main():\n    pass", FIB),
    ("def fibonacci(n):\n", "    return n\n# done\n", "    return n"),
    # the prompt's line is unfinished: the completion's first line finishes it
    ("def fibonacci(n", "):\n    return n\n\nx = 1", "):\n    return n"),
    # a method: the block ends at the method's column, not at the class's
    ("class Stack:\n    def push(self, item):", "\n        self.items.append(item)\n\n    def pop(self):\n",
     "\n        self.items.append(item)"),
    # inside a body (HumanEval's prompts end in a docstring): the block ends left of it
    ('def f():\n    """Doc.\n    """\n', "    return 1\n\ndef g(): pass", "    return 1"),
    ("def f():\n    ret", "urn 1\n\nx = 2", "urn 1"),
    # lines of a string or of brackets are not statements
    ('def f():\n    """Doc.\n    """\n', "    s = '''\nabc\n'''\n    return s\nx = 1",
     "    s = '''\nabc\n'''\n    return s"),
    ("def f():\n    x = [\n", "1,\n2]\n    return x\nprint(x)", "1,\n2]\n    return x"),
    # a comment back at the header's column ends the block too
    ("def f():\n", "    x = 1\n    # c\n# top\n", "    x = 1\n    # c"),
    # top-level code: HumanEval's stop sequences, after the completion's first line
    ("import os\n", "import sys\n\ndef main():\n    pass\n", "import sys"),
    ("# add two numbers\n", "def add(a, b):\n    return a + b\n\n# next\n", "def add(a, b):\n    return a + b"),
]


@pytest.mark.parametrize(("prompt", "completion", "kept"), CASES)
def test_block_end_cuts_where_the_block_ends(prompt, completion, kept):
    block = BlockEnd(prompt)
    at = block.cut(completion)
    assert at is not None and completion[:at] == kept
    ast.parse(prompt + kept)  # what is kept is the whole block
    # no shorter completion is cut earlier, and while open the certain part only grows
    shown, over = "", False
    for end in range(len(completion) + 1):
        part = completion[:end]
        earlier = block.cut(part)
        assert earlier is None or part[:earlier] == kept
        if end and not over:  # the stopping criterion's check fires with the first text that ends the block
            assert block.ended(part, part[-1:]) is (earlier is not None), part
            over = earlier is not None
        certain = block.certain(part)
        assert certain.startswith(shown) and kept.startswith(certain), (part, certain)
        shown = certain


@pytest.mark.parametrize(("prompt", "completion"), [
    ("def f():", "\n    x = 'abc"),  # an unterminated string: nothing is certain to end it
    ("def f():", "\n    return [\n1,\n"),
    ("def f():", "\n    return 1\n\n"),  # a blank line ends nothing yet
    ("x = 1\n", "y = 2\nz = 3\n"),  # top-level statements go on
])
def test_block_end_waits_while_the_block_is_open(prompt, completion):
    assert BlockEnd(prompt).cut(completion) is None


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_stops_at_the_end_of_the_block_and_raw_does_not(capsys, tmp_path):
    """A model that writes a function and then more: the default output is the function alone,
    streamed or not, and generation stopped there; --raw prints everything."""
    prompt, body, rest = "def add(a, b):\n    ", "return a + b", "\nprint(add)"
    folder = scripted_checkpoint(tmp_path / "scripted", prompt, body + rest)
    args = ["generate", prompt, "--model", str(folder), "--max-new-tokens", "40"]
    code, raw, err = run_cli(capsys, *args, "--raw")
    assert code == 0, err
    assert raw == prompt + body + rest + "\n"
    for extra in ((), ("--stream",), ("--temperature", "0.1", "--num-samples", "2", "--seed", "0")):
        code, out, err = run_cli(capsys, *args, *extra)
        assert code == 0, err
        expected = prompt + body + "\n"
        assert out == (expected if "--num-samples" not in extra else
                       "".join(f"===== sample {i} =====\n{expected}" for i in (1, 2))), extra
    ast.parse(prompt + body)
    # the sample stopped at the token that left the block, not at the end of the script
    from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
    from codegen_lm.cli.generate import _block_criterion
    from codegen_lm.engine import Engine, GenerationParams

    tok = CodeGenTokenizerFast.from_pretrained(folder)
    engine = Engine(CodeGenForCausalLM.from_pretrained(folder), tok)
    ids = tok.encode(prompt)
    params = GenerationParams(max_new_tokens=40, stopping_criteria=(_block_criterion(BlockEnd(prompt), tok, len(ids)),))
    out = engine.submit(ids, params).result().outputs[0]
    assert out.finish_reason == "stop" and out.text == body + "\nprint"


def test_generation_stops_when_the_block_ends():
    """The stop is a stopping criterion: the sample ends with the token that leaves the block."""
    from codegen_lm.cli.generate import _block_criterion

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    prompt = "def f():"
    criterion = _block_criterion(BlockEnd(prompt), Tok(), len(prompt))
    rows = [prompt + "\n    return 1\n", prompt + "\n    return 1\nx", prompt + "\n    x = (\n1"]
    for row, ends in zip(rows, (False, True, False)):
        ids = torch.tensor([[ord(c) for c in row]])
        assert criterion(ids, None).tolist() == [ends], row
