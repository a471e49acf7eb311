"""llama.cpp's server as a benchmark peer (`python -m bench.server --llamacpp`); never a test dependency.

Built from the llama-cpp-python sdist, which vendors llama.cpp: `pip download --no-binary :all:`,
then CMake builds only the `llama-server` and `llama-bench` targets (CPU, native ISA, no web UI download, no HTTPS)
into a cache directory ($CHIAR_BENCH_CACHE, default ~/.cache/chiar-bench/llamacpp); a finished
build is reused. The same-size Llama (a Hugging Face directory) is converted to an f32 GGUF with
the vendored `convert_hf_to_gguf.py` and the vendored `gguf-py` (the converter's own version of
the `gguf` package, so the two always match).

    python -m bench.llamacpp build     # build (or report the cached build) and print how
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from model.storage import atomic_write_text

SDIST_VERSION = "0.3.36"  # llama-cpp-python; the llama.cpp commit it vendors is recorded in build.json
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    # no network at build time: the web UI is neither downloaded nor built with npm
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
]


def cache_dir() -> Path:
    """Where sources, the build and converted models live."""
    root = Path(os.environ.get("CHIAR_BENCH_CACHE", Path.home() / ".cache" / "chiar-bench"))
    return root / "llamacpp"


@dataclass
class LlamaCppBuild:
    """A finished build: the server binary and how it was made."""

    server: str
    bench: str  # llama-bench: the model-level decode row of `make bench-model`
    source_dir: str
    sdist: str
    llama_cpp_commit: str
    cmake_flags: list[str]
    compiler: str
    build_seconds: float

    def describe(self) -> str:
        """One line for the benchmark report."""
        return (f"llama.cpp {self.llama_cpp_commit[:10]} vendored in {self.sdist}, `llama-server` built with "
                f"{self.compiler} and CMake {' '.join(self.cmake_flags)} ({self.build_seconds / 60:.0f} min build)")


def _run(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        code = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {code}; log {log}:\n{tail}")


def vendored_source(root: Path, log: Path) -> Path:
    """The llama.cpp tree inside the llama-cpp-python sdist (downloaded and unpacked once)."""
    src = root / "src"
    unpacked = src / f"llama_cpp_python-{SDIST_VERSION}"
    if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        src.mkdir(parents=True, exist_ok=True)
        archive = src / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
        if not archive.is_file():
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  f"llama-cpp-python=={SDIST_VERSION}", "-d", str(src)], log)
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def _commit(source: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git metadata in the sdist)"


def ensure_built(jobs: int | None = None) -> LlamaCppBuild:
    """Build llama-server once (minutes on 2 cores); later calls return the cached build."""
    import time

    root = cache_dir()
    info = root / "build.json"
    if info.is_file():
        fields = json.loads(info.read_text())
        if Path(fields.get("server", "")).is_file() and Path(fields.get("bench", "")).is_file():
            return LlamaCppBuild(**fields)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    start = time.monotonic()
    source = vendored_source(root, log)
    build_dir = root / "build"
    _run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
          *CMAKE_FLAGS], log)
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "llama-bench", "-j", str(jobs or os.cpu_count() or 2)], log)
    server, bench = build_dir / "bin" / "llama-server", build_dir / "bin" / "llama-bench"
    for binary in (server, bench):
        if not binary.is_file():
            raise RuntimeError(f"build finished but {binary} is missing; log {log}")
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    build = LlamaCppBuild(server=str(server), bench=str(bench), source_dir=str(source), sdist=f"llama-cpp-python {SDIST_VERSION} sdist",
                          llama_cpp_commit=_commit(source), cmake_flags=CMAKE_FLAGS, compiler=compiler,
                          build_seconds=time.monotonic() - start)
    atomic_write_text(info, json.dumps(asdict(build), indent=2) + "\n")
    return build


# Our tokenizer is byte-level BPE with GPT-2's pre-tokenizer regex, which the converter identifies by
# hashing the tokens of a probe text against known models; ours is not among them, so it is told "gpt-2".
# It also tries sentencepiece first for a Llama; ours has no tokenizer.model, so it goes to the BPE path.
_CONVERT = """
import runpy, sys
from conversion.base import TextModel
from conversion.llama import LlamaModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(build: LlamaCppBuild, hf_dir: Path, out: Path) -> Path:
    """f32 GGUF of a Hugging Face Llama directory, with the vendored converter and its gguf-py."""
    if out.is_file():
        return out
    source = Path(build.source_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
    log = cache_dir() / "convert.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        _run([sys.executable, "-c", _CONVERT, str(source / "convert_hf_to_gguf.py"), str(hf_dir),
              "--outtype", "f32", "--outfile", str(part)], log, env=env)
        part.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`build`: build or find the cached llama-server and print how it was built."""
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] != ["build"]:
        print(__doc__)
        return 2
    build = ensure_built()
    print(build.describe())
    print(build.server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
