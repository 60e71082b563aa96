import platform

from facekd.runtime import keep_freed_memory


def test_keep_freed_memory_applies_on_glibc_only():
    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
