"""Installed Python packages as training data: where their source is, and whether its licence lets
us train on it and ship the result.

A package's licence is read from its own metadata, in the order packaging tools trust it: the SPDX
`License-Expression` (PEP 639), else a short `License` field that reads as an SPDX expression or a
known alias ("Apache 2.0", "BSD"), else its "License ::" trove classifiers. Only permissive licences
are taken; copyleft ones (GPL, LGPL, MPL, EUPL...) and unknown ones are refused with the reason, so a
data set never holds code whose terms it cannot meet. Each taken package's name, version and licence
go into the data manifest.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# SPDX identifiers of licences that ask no more than keeping a notice (checked case-insensitively)
PERMISSIVE = frozenset(s.lower() for s in (
    "MIT", "MIT-0", "MIT-CMU", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear", "0BSD", "Apache-2.0",
    "ISC", "PSF-2.0", "Python-2.0", "CNRI-Python", "Zlib", "Unlicense", "CC0-1.0", "BSL-1.0", "HPND", "NCSA",
    "X11", "LicenseRef-BSD",
))
PERMISSIVE_EXCEPTIONS = frozenset({"llvm-exception"})
# what `License` fields and classifiers say, as SPDX identifiers
ALIASES = {
    "apache": "Apache-2.0", "apache 2.0": "Apache-2.0", "apache 2": "Apache-2.0", "apache-2": "Apache-2.0",
    "apache 2.0 license": "Apache-2.0", "apache license 2.0": "Apache-2.0", "apache license, version 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0", "bsd": "LicenseRef-BSD", "bsd license": "LicenseRef-BSD",
    "bsd 3-clause": "BSD-3-Clause", "bsd-3": "BSD-3-Clause", "new bsd": "BSD-3-Clause", "bsd 2-clause": "BSD-2-Clause",
    "mit license": "MIT", "isc license": "ISC", "isc license (iscl)": "ISC",
    "python software foundation license": "PSF-2.0",
    "psf": "PSF-2.0", "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0", "the unlicense (unlicense)": "Unlicense",
    "zlib/libpng license": "Zlib", "boost software license 1.0 (bsl-1.0)": "BSL-1.0",
    "gnu general public license v3 (gplv3)": "GPL-3.0", "gnu general public license v2 (gplv2)": "GPL-2.0",
    "gnu lesser general public license v3 (lgplv3)": "LGPL-3.0",
    "gnu lesser general public license v2 or later (lgplv2+)": "LGPL-2.0-or-later",
}
_COPYLEFT = re.compile(r"(A|L)?GPL-|MPL-|EPL-|EUPL-|CDDL-|OSL-|CPL-|CECILL", re.IGNORECASE)
_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z0-9.+:-]+)")


class LicenceError(ValueError):
    """A package that cannot be used as training data; the message names it and says why."""


@dataclass(frozen=True)
class PackageSource:
    distribution: str
    version: str
    licence: str  # an SPDX expression
    licence_from: str  # License-Expression, License or classifiers
    roots: tuple[Path, ...]  # its top-level package folders and modules


def spdx_permissive(expression: str) -> bool:
    """Whether code under the SPDX `expression` may be used: every AND term permissive, at least one
    OR alternative; `WITH` exceptions must be ones that only grant more (LLVM's)."""
    tokens = _TOKEN.findall(expression)
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", expression) or not tokens:
        raise ValueError(f"not an SPDX expression: {expression!r}")
    at = 0

    def peek() -> str | None:
        return tokens[at] if at < len(tokens) else None

    def take() -> str:
        nonlocal at
        if at >= len(tokens):
            raise ValueError(f"unfinished SPDX expression: {expression!r}")
        at += 1
        return tokens[at - 1]

    def chain(word: str, operand: Callable[[], bool], combine: Callable[[bool, bool], bool]) -> bool:
        ok = operand()
        while (peek() or "").upper() == word:
            take()
            ok = combine(ok, operand())  # the operand is parsed either way
        return ok

    def alternatives() -> bool:  # a OR b OR ...: one permissive alternative is enough
        return chain("OR", conjunction, lambda a, b: a or b)

    def conjunction() -> bool:  # a AND b AND ...: every term must be permissive
        return chain("AND", term, lambda a, b: a and b)

    def term() -> bool:
        token = take()
        if token == "(":
            ok = alternatives()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            return ok
        if token == ")" or token.upper() in ("AND", "OR", "WITH"):
            raise ValueError(f"unexpected {token!r} in {expression!r}")
        ok = token.lower().removesuffix("+") in PERMISSIVE
        if (peek() or "").upper() == "WITH":
            take()
            exception = take()
            ok = ok and exception.lower() in PERMISSIVE_EXCEPTIONS
        return ok

    result = alternatives()
    if at != len(tokens):
        raise ValueError(f"unexpected {tokens[at]!r} in {expression!r}")
    return result


def licence_of(dist: metadata.Distribution) -> tuple[str, str]:
    """(SPDX expression, which metadata field said so) of an installed distribution."""
    meta = dist.metadata
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression, "License-Expression"
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 80:
        spdx = ALIASES.get(field.lower().removesuffix("."), field)
        try:
            spdx_permissive(spdx)
            known = all(t.lower().removesuffix("+") in PERMISSIVE or _COPYLEFT.match(t) or t in "()"
                        or t.upper() in ("AND", "OR", "WITH") or t.lower() in PERMISSIVE_EXCEPTIONS
                        for t in _TOKEN.findall(spdx))
        except ValueError:
            known = False
        if known:
            return spdx, "License"
        # free text or a word such as UNKNOWN: the classifiers say more
    found = []
    for classifier in meta.get_all("Classifier") or []:
        parts = [p.strip() for p in classifier.split("::")]
        if parts[0] == "License" and len(parts) > 1 and parts[-1] != "OSI Approved":
            found.append(ALIASES.get(parts[-1].lower(), "LicenseRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", parts[-1])))
    if found:  # several classifiers: the user may pick any of them
        return " OR ".join(dict.fromkeys(found)), "classifiers"
    raise LicenceError(f"package {meta['Name']}: its metadata names no licence (License-Expression, License or "
                       "a License classifier)")


def package_source(name: str, paths: Sequence[str | os.PathLike] = ()) -> PackageSource:
    """The installed distribution `name` as training data, or a LicenceError saying why it cannot be.
    `paths`: folders searched before the running Python's own (a `pip install --target` folder holds
    packages for the data without installing them into the environment)."""
    found = next(iter(metadata.distributions(name=name, path=[*map(str, paths), *sys.path])), None)
    if found is None:
        where = f" in {', '.join(map(str, paths))} or" if paths else ""
        raise LicenceError(f"package {name}: not installed{where} here (pip install it first)")
    dist = found
    licence, source = licence_of(dist)
    try:
        permissive = spdx_permissive(licence)
    except ValueError as exc:
        raise LicenceError(f"package {name}: licence {licence!r} from its {source}: {exc}") from None
    if not permissive:
        raise LicenceError(f"package {name}: licence {licence} (from its {source}) is not permissive; "
                           "its code is left out")
    roots: dict[str, Path] = {}
    for file in dist.files or ():  # the top-level folders and modules that hold its .py files
        parts = file.parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        if parts[-1].endswith(".py"):
            roots.setdefault(parts[0], Path(dist.locate_file(parts[0])))
    roots = {k: p for k, p in roots.items() if p.exists()}
    if not roots:
        raise LicenceError(f"package {name}: its installed files hold no Python source")
    return PackageSource(dist.metadata["Name"], dist.version, licence, source, tuple(roots[k] for k in sorted(roots)))
