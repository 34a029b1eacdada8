"""Checks of a valid config against this machine, before anything starts: does every command's
argv[0] resolve to an executable (with the program's own PATH and cwd), can every target be
imported. ``corral run`` refuses to start on any problem; ``corral check`` lists them."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys

from corral.cli._model import Config, ProgramConfig
from corral.cli._values import ConfigIssue

__all__ = ["check_commands", "check_targets", "resolve_command"]


def resolve_command(prog: ProgramConfig, base_cwd: str | None = None) -> str | None:
    """The executable ``prog``'s argv[0] runs, as ``subprocess.Popen`` will find it; None if
    there is none (not found, not a file, not executable).

    A name without a slash is looked up in the program's PATH (its ``env``, else corral's); a
    relative path is taken from the program's ``cwd`` (else corral's), as exec does.
    """
    assert prog.command is not None
    argv0 = prog.command[0]
    cwd = prog.cwd or base_cwd or os.getcwd()
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
        ok = os.path.isfile(path) and os.access(path, os.X_OK)
        return os.path.normpath(path) if ok else None
    env_path = prog.full_env().get("PATH", os.defpath)
    # Relative PATH entries are relative to the child's cwd.
    dirs = [d if os.path.isabs(d) else os.path.join(cwd, d or ".")
            for d in env_path.split(os.pathsep)]
    return shutil.which(argv0, path=os.pathsep.join(dirs))


def check_commands(config: Config, base_cwd: str | None = None) -> list[ConfigIssue]:
    """An issue for every command program whose argv[0] does not resolve."""
    issues = []
    for name, prog in config.programs.items():
        if prog.command is None or prog.shell:
            continue
        if resolve_command(prog, base_cwd) is None:
            argv0 = prog.command[0]
            if "/" in argv0:
                where = f"relative to {prog.cwd or base_cwd or os.getcwd()}" if not \
                    os.path.isabs(argv0) else "there"
                why = f"no executable file {where}"
            else:
                why = ("not found in PATH="
                       f"{prog.full_env().get('PATH', os.defpath)}")
            issues.append(ConfigIssue(config.path, prog.line, f"program.{name}.command",
                                      "a program that exists and is executable",
                                      f"{argv0!r} ({why})"))
    return issues


def check_targets(config: Config, config_dir: str | None, *, load: bool) -> list[ConfigIssue]:
    """An issue for every target that cannot be imported (``load``: import it and look the
    function up, as ``corral run`` will; else only find its top-level module, as
    ``corral check`` does, which runs no user code)."""
    issues = []
    added = False
    if config_dir and config_dir not in sys.path:
        sys.path.insert(0, config_dir)
        added = True
    try:
        for name, prog in config.programs.items():
            if prog.target is None:
                continue
            module, _, attr = prog.target.partition(":")
            try:
                if load:
                    obj = importlib.import_module(module)
                    for part in attr.split("."):
                        obj = getattr(obj, part)
                    if not callable(obj):
                        raise TypeError(f"{prog.target} is a {type(obj).__name__}, not a "
                                        "function")
                elif importlib.util.find_spec(module.split(".")[0]) is None:
                    raise ModuleNotFoundError(f"No module named {module.split('.')[0]!r}")
            except (Exception, SystemExit) as exc:
                # SystemExit too: a module that calls sys.exit() at import (a missing
                # setting) is a bad target, not a reason for corral to exit.
                why = (f"its import called sys.exit({exc.code!r})"
                       if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
                issues.append(ConfigIssue(config.path, prog.line, f"program.{name}.target",
                                          "an importable module:function",
                                          f"{prog.target!r} ({why})"))
    finally:
        if added and not load:
            sys.path.remove(config_dir)  # type: ignore[arg-type]
    return issues
