"""freed_memory_kept: glibc keeps freed memory within a block, as without Dask's setting."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc settings",
)

# mapped() allocates and frees a block (1 MiB unless given) and says whether glibc served
# it by a fresh mapping (mmap) or from its heap, from mallinfo2's count of mapped blocks.
PROBE = """
import ctypes
from sk_padim.allocator import freed_memory_kept

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped(size=2**20):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    fresh = libc.mallinfo2().hblks > before
    libc.free(block)
    return "mmap" if fresh else "heap"
"""


def run_probe(body: str, **environ) -> list[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    script = PROBE + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, **environ},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_a_trim_threshold_in_the_environment_is_lifted_within_the_block_only():
    body = """
    print(mapped(), mapped())  # MALLOC_TRIM_THRESHOLD_ turns the dynamic threshold off
    with freed_memory_kept():
        print(mapped())
        with freed_memory_kept():  # nested blocks: the outer one still holds after
            print(mapped())
        print(mapped())
    print(mapped())  # the environment's setting is back
    """
    assert run_probe(body, MALLOC_TRIM_THRESHOLD_="65536") == [
        "mmap",
        "mmap",
        "heap",
        "heap",
        "heap",
        "mmap",
    ]


def test_without_a_threshold_in_the_environment_glibc_is_left_alone():
    body = """
    with freed_memory_kept():
        pass
    # glibc's dynamic threshold rises to a mapped block's size when it is freed.
    print(mapped(24 * 2**20), mapped(24 * 2**20))
    """
    assert run_probe(body) == ["mmap", "heap"]


@pytest.mark.parametrize("value", ["not-a-number", str(2**40)])
def test_a_threshold_mallopt_could_not_restore_is_left_alone(value):
    body = """
    before = mapped()
    with freed_memory_kept():
        inside = mapped()
    print(before, inside, mapped())
    """
    environ = {"MALLOC_MMAP_THRESHOLD_": value, "MALLOC_TRIM_THRESHOLD_": "65536"}
    before, inside, after = run_probe(body, **environ)
    assert before == inside == after
