"""Decoding exit statuses: returncodes, raw wait statuses, texts and hints."""

from __future__ import annotations

import signal

import pytest

from corral.exitstatus import ExitStatus, signal_name

pytestmark = pytest.mark.timeout(10)


def _exited(code: int) -> int:
    """A raw wait status for a normal exit (what waitpid reports)."""
    return (code & 0xFF) << 8


def _signaled(signum: int, core: bool = False) -> int:
    return signum | (0x80 if core else 0)


@pytest.mark.parametrize("code", [0, 1, 2, 3, 42, 120, 137, 255])
def test_from_returncode_exit(code: int) -> None:
    st = ExitStatus.from_returncode(code)
    assert st == ExitStatus(code=code)
    assert st.signal is None and not st.core_dumped
    assert st.returncode == code
    assert st.clean is (code == 0)
    assert st.signal_name is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV, 1, 64])
def test_from_returncode_signal(signum: int) -> None:
    st = ExitStatus.from_returncode(-signum)
    assert st.code is None
    assert st.signal == signum
    assert st.returncode == -signum
    assert not st.clean
    assert not st.core_dumped
    assert ExitStatus.from_returncode(-signum, core_dumped=True).core_dumped


def test_from_returncode_ignores_core_flag_for_exit_codes() -> None:
    assert ExitStatus.from_returncode(1, core_dumped=True) == ExitStatus(code=1)


@pytest.mark.parametrize("code", [0, 1, 2, 77, 255])
def test_from_wait_status_exit(code: int) -> None:
    st = ExitStatus.from_wait_status(_exited(code))
    assert st == ExitStatus(code=code)
    assert st.returncode == code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV,
                                    signal.SIGABRT, signal.SIGINT])
@pytest.mark.parametrize("core", [False, True])
def test_from_wait_status_signal(signum: int, core: bool) -> None:
    st = ExitStatus.from_wait_status(_signaled(signum, core))
    assert st == ExitStatus(signal=signum, core_dumped=core)
    assert st.returncode == -signum
    assert st.signal_name == signal.Signals(signum).name


def test_describe_texts() -> None:
    assert ExitStatus(code=0).describe() == "exit code 0"
    assert ExitStatus(code=1).describe() == "exit code 1"
    assert str(ExitStatus(code=3)) == "exit code 3"
    assert ExitStatus(signal=signal.SIGTERM).describe() == "SIGTERM(-15)"
    assert ExitStatus(signal=signal.SIGKILL).describe() == "SIGKILL(-9)"
    assert (ExitStatus.from_wait_status(_signaled(signal.SIGSEGV, core=True)).describe()
            == "SIGSEGV(-11), core dumped")
    assert str(ExitStatus.from_returncode(-11, core_dumped=True)) == "SIGSEGV(-11), core dumped"


def test_hints() -> None:
    assert "OOM" in (ExitStatus(signal=signal.SIGKILL).hint or "")
    assert "kill -9" in (ExitStatus(signal=signal.SIGKILL).hint or "")
    assert "native code" in (ExitStatus(signal=signal.SIGSEGV).hint or "")
    assert "native code" in (ExitStatus(signal=signal.SIGABRT).hint or "")
    assert "closed pipe" in (ExitStatus(signal=signal.SIGPIPE).hint or "")
    assert "exception" in (ExitStatus(code=1).hint or "")
    # Not only Python: a command's worker exits 1 for any failure.
    assert "a program's general failure" in (ExitStatus(code=1).hint or "")
    assert "could not run it" in (ExitStatus(code=126).hint or "")
    assert "did not find the command" in (ExitStatus(code=127).hint or "")
    assert "SIGKILL" in (ExitStatus(code=137).hint or "")
    # No hint where there is nothing useful to say.
    assert ExitStatus(code=0).hint is None
    assert ExitStatus(code=42).hint is None
    assert ExitStatus(signal=signal.SIGTERM).hint is None
    assert ExitStatus(signal=99).hint is None


def test_signal_name() -> None:
    assert signal_name(9) == "SIGKILL"
    assert signal_name(int(signal.SIGSEGV)) == "SIGSEGV"
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(99) == "signal 99"
    assert signal_name(0) == "signal 0"


def test_unknown_signal_describe_and_name() -> None:
    st = ExitStatus.from_returncode(-99)
    assert st.signal_name == "signal 99"
    assert st.describe() == "signal 99(-99)"
    assert st.hint is None


def test_frozen_and_hashable() -> None:
    st = ExitStatus(code=1)
    with pytest.raises(AttributeError):
        st.code = 2  # type: ignore[misc]
    assert len({ExitStatus(code=1), ExitStatus(code=1), ExitStatus(signal=9)}) == 2


def test_unknown_status_says_who_took_it() -> None:
    st = ExitStatus.unknown_status()
    assert st.unknown and st == ExitStatus()
    assert not st.clean and st.returncode is None and st.signal_name is None
    assert st.describe() == "unknown exit status"
    assert st.hint is not None and "os.waitpid(-1" in st.hint and "os.wait()" in st.hint
    assert not ExitStatus(code=0).unknown and not ExitStatus(signal=9).unknown
