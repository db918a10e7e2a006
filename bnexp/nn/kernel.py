"""The layer's compiled kernel (bn_kernel.c), built with the system C compiler on first use, called via ctypes.

Why not ``torch.utils.cpp_extension``: building against torch's headers takes a minute or more on two
cores, on every fresh machine and CI run; bn_kernel.c includes only the C library and builds in about a
second (it also says why a kernel at all). The price is raw pointers: bnexp.nn.batchnorm passes only non-empty,
contiguous CPU float32/float64 tensors of one dtype (``eligible``) and takes its tensor-op path for
anything else.

The shared library is cached in ``$BNEXP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bnexp``, else
``~/.cache/bnexp``; ``$TMPDIR/bnexp-<uid>`` if that cannot be written) under a hash of the source, the
compiler command and this CPU's model and flags, since it is built for the CPU it runs on (-march=native).
Loading a library runs its code, and its name can be computed by anyone, so a cache directory is used only
if no one else can write to it: it is created private (0700), and it, the folders above it and the library
must belong to this user (or root) and not be writable by group or others (the sticky /tmp excepted). A
cache that fails these checks is not read: the kernel is built in a fresh private temporary directory,
loaded, and the directory removed. ``BNEXP_KERNEL=0`` turns the kernel off; so does a build that fails
(no compiler, say), with one warning, and the layer then runs its tensor-op path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bn_kernel.c")
SOURCES = (SOURCE, Path(__file__).with_name("bn_kernel_body.h"))  # all that the build reads: all in the key
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared"]
NATIVE = ["-march=native"]
OPENMP = ["-fopenmp"]
BUILD_TIMEOUT_S = 120  # about 1 s normally; a hung compiler must not hang training

_ptr, _i64, _f64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    # x, y, N, C, L, weight, bias, eps, unbiased, stats, running_mean, running_var, factor
    "bn_train_forward": ([_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _f64, _int, _ptr, _ptr, _ptr, _f64], _int),
    # x, y, G, N, C, L, weight, bias, eps, unbiased, stats
    "bn_grouped_forward": ([_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _f64, _int, _ptr], _int),
    # g, x, dx, N, C, L, weight, mean, invstd, unbiased, grad_weight, grad_bias
    "bn_train_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int, _ptr, _ptr], _int),
    # x, y, N, C, L, running_mean, running_var, weight, bias, eps
    "bn_eval_forward": ([_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _f64], _int),
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

# Above this many elements ATen's own ops split work across threads. A kernel built without OpenMP is
# single-threaded, so with more than one torch thread the layer then leaves large inputs to the tensor-op
# path; one built with it (``Kernel.parallel``) splits them over torch's threads itself.
PARALLEL_MIN_NUMEL = 1 << 15


# Outputs at least this large get huge pages (bn_advise_hugepages in bn_kernel.c says why); below it
# the allocator reuses memory it already holds, so there are no page faults to save.
HUGEPAGE_MIN_BYTES = 8 << 20


class Kernel:
    """The kernel's entry points per dtype: ``train_forward[dtype]`` etc., ctypes functions."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self.lib = lib
        lib.bn_advise_hugepages.argtypes, lib.bn_advise_hugepages.restype = [_ptr, _i64], _int
        self._advise = lib.bn_advise_hugepages
        lib.bn_set_parallel_min.argtypes, lib.bn_set_parallel_min.restype = [_i64], None
        lib.bn_openmp.restype = _int
        lib.bn_set_parallel_min(PARALLEL_MIN_NUMEL)
        # Whether the kernel splits channels over torch's OpenMP threads (see bn_kernel.c).
        self.parallel = bool(lib.bn_openmp())
        for name, (argtypes, restype) in _SIGNATURES.items():
            table = {}
            for dtype, suffix in _SUFFIX.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, restype
                table[dtype] = fn
            setattr(self, name.removeprefix("bn_"), table)

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised output shaped like (contiguous) x, on huge pages when it is large."""
        out = torch.empty_like(x)
        nbytes = out.numel() * out.element_size()
        if nbytes >= HUGEPAGE_MIN_BYTES:
            self._advise(out.data_ptr(), nbytes)
        return out

    @contextmanager
    def parallel_min(self, numel: int) -> Iterator[None]:
        """Run a block with the kernel going parallel from ``numel`` elements on (tests: 0 forces threads)."""
        self.lib.bn_set_parallel_min(numel)
        try:
            yield
        finally:
            self.lib.bn_set_parallel_min(PARALLEL_MIN_NUMEL)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    if os.environ.get("BNEXP_CACHE_DIR"):
        return Path(os.environ["BNEXP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnexp"


def _cpu_identity() -> str:
    """Model name and feature flags: a library built with -march=native must not move to another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _gomp_libraries() -> set[str]:
    """The files mapped into this process under the name libgomp.so.1 (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "/" in ln}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p) == "libgomp.so.1"}


def torch_openmp() -> bool:
    """Whether a -fopenmp build would share torch's OpenMP runtime rather than load a second one.

    GCC's -fopenmp links against ``libgomp.so.1``; the dynamic loader resolves that name to the library
    of that soname already loaded, so this holds when torch has loaded one (torch's Linux wheels ship and
    load their own) and only one. (Other packages' renamed copies, such as scikit-learn's, are theirs.)
    Two runtimes would each keep a pool of threads competing for the same cores.
    """
    return len(_gomp_libraries()) == 1


def _build(cc: str, out_dir: Path, openmp: bool | None = None) -> Path:
    """Compile into out_dir (atomically: concurrent processes may build at once). Raises on failure.

    With ``openmp`` (default: torch_openmp()) it tries a -fopenmp build first, then one without.
    """
    source = b"".join(p.read_bytes() for p in SOURCES)
    last_error = ""
    threaded = [OPENMP] if (torch_openmp() if openmp is None else openmp) else []
    # A compiler that does not know -march=native (or -fopenmp) still gets a portable build.
    for extra in [*(t + NATIVE for t in threaded), *threaded, NATIVE, []]:
        command = [cc, *FLAGS, *extra]
        key = hashlib.sha256(source + repr(command).encode() + _cpu_identity().encode()).hexdigest()[:16]
        target = out_dir / f"bn_kernel-{key}.so"
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            try:
                result = subprocess.run([*command, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                        text=True, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{cc} took more than {BUILD_TIMEOUT_S} s") from None
            if result.returncode == 0:
                os.replace(tmp, target)
                return target
            last_error = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} failed: {last_error}")


_UNSET = object()
_built: Kernel | None | object = _UNSET  # the outcome of the one build attempt of this process
_enabled = os.environ.get("BNEXP_KERNEL", "1") != "0"


def _private_dir(path: Path) -> Path | None:
    """`path` as a cache only this user can write (made 0700 if missing), by its real location; None if it
    cannot be made or fails the checks of the module's docstring."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        real = Path(os.path.realpath(path))
        st = os.lstat(real)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        for folder in real.parents:  # whoever may rename a folder above may swap the cache for their own
            st = os.lstat(folder)
            if st.st_uid not in (0, os.getuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                return None
        return real
    except (OSError, ValueError):
        return None


def _trusted_library(path: Path) -> bool:
    """A library in a private cache that this user wrote: a regular file, not a link, not writable by others."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load_built(cc: str) -> Kernel:
    """Build (or reuse) the library in the first private cache, else in a fresh private directory."""
    for candidate in (cache_dir(), Path(tempfile.gettempdir()) / f"bnexp-{os.getuid()}"):
        folder = _private_dir(candidate)
        if folder is None:
            continue
        try:
            path = _build(cc, folder)
        except OSError:  # an unwritable cache (a read-only home, say): build where we may write
            continue
        if _trusted_library(path):
            return Kernel(ctypes.CDLL(str(path)), path)
    private = Path(tempfile.mkdtemp(prefix="bnexp-kernel-"))  # 0700, a fresh name: no one else's file
    try:
        path = _build(cc, private)
        return Kernel(ctypes.CDLL(str(path)), path)  # mapped: the file can go
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _build_once() -> Kernel | None:
    global _built
    if _built is _UNSET:
        _built = None
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            _built = _load_built(cc)
            if _built.parallel and not torch_openmp():
                # Loading it brought a second OpenMP runtime in after all: keep to one thread.
                _built.lib.bn_set_parallel_min(2**62)
                _built.parallel = False
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"bnexp: BN kernel not built ({exc}); the layer uses its slower tensor-op path",
                          RuntimeWarning, stacklevel=3)
    return _built  # type: ignore[return-value]


def load() -> Kernel | None:
    """The kernel (built or loaded on first use), or None when it is turned off or cannot be built."""
    if not _enabled:
        return None
    if _built is not _UNSET:
        return _built  # type: ignore[return-value]
    return _build_once()


@contextmanager
def enabled(on: bool) -> Iterator[Kernel | None]:
    """Run a block with the kernel on or off (tests, benchmarks, `bnexp check`), then restore the setting.

    Yields what the layer then uses: the kernel, or None.
    """
    global _enabled
    previous, _enabled = _enabled, bool(on)
    try:
        yield load()
    finally:
        _enabled = previous


def eligible(x: torch.Tensor, kern: Kernel) -> bool:
    """Whether the kernel can take x: contiguous CPU float32/float64, and ATen's threads cannot do better."""
    return (
        x.dtype in _SUFFIX
        and x.numel() > 0
        and x.is_cpu
        and x.is_contiguous()
        and (kern.parallel or x.numel() < PARALLEL_MIN_NUMEL or torch.get_num_threads() == 1)
    )
