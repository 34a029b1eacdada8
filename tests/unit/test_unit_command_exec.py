"""Why a command could not be exec'd: a script whose #! interpreter is missing is named as
such (exec reports it as the script being missing). Real files, real exec attempts; nothing
is started (each one fails in exec)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from corral._command import CommandProcess, missing_interpreter


def _script(path: Path, first_line: bytes) -> Path:
    path.write_bytes(first_line + b"\necho hi\n")
    path.chmod(0o755)
    return path


@pytest.mark.timeout(30)
def test_a_missing_interpreter_is_named(tmp_path: Path) -> None:
    script = _script(tmp_path / "job.sh", b"#!/no/such/interpreter -x")
    with pytest.raises(FileNotFoundError) as info:
        CommandProcess.start([str(script)])
    assert info.value.errno == errno.ENOENT
    assert "the interpreter its #! line names, '/no/such/interpreter', does not" in str(
        info.value)
    assert info.value.filename == str(script)


@pytest.mark.timeout(30)
def test_windows_line_endings_are_named(tmp_path: Path) -> None:
    script = _script(tmp_path / "crlf.sh", b"#!/bin/sh\r")
    with pytest.raises(FileNotFoundError, match="Windows line endings"):
        CommandProcess.start([str(script)])


@pytest.mark.timeout(30)
def test_found_through_path_and_relative_to_cwd(tmp_path: Path) -> None:
    _script(tmp_path / "job", b"#!  /no/such/sh")
    env = {"PATH": str(tmp_path)}
    assert "'/no/such/sh'" in str(missing_interpreter("job", env, None))
    assert "'/no/such/sh'" in str(missing_interpreter("./job", {}, str(tmp_path)))


@pytest.mark.timeout(30)
def test_other_missing_programs_keep_the_plain_error(tmp_path: Path) -> None:
    # Really missing, a binary, a #! whose interpreter exists: not this case.
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        CommandProcess.start([str(tmp_path / "nothing-here")])
    assert missing_interpreter(str(tmp_path / "nothing-here"), dict(os.environ), None) is None
    assert missing_interpreter("/bin/sh", dict(os.environ), None) is None
    ok = _script(tmp_path / "ok.sh", b"#!/bin/sh")
    assert missing_interpreter(str(ok), dict(os.environ), None) is None
    assert missing_interpreter(str(_script(tmp_path / "blank", b"#!")), {}, None) is None
