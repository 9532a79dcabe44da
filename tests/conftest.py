"""Test-session setup: a persistent XLA compilation cache private to each test process.

Compilation dominates this suite's time, and several tests compile the same program more than
once (a harness run repeated to check resume or determinism, the same trainer config in two
tests of a file). JAX's persistent compilation cache keys an executable on the lowered program
and the compile options, so compiling an identical program again becomes a disk read. Tracing and
lowering still run every time; only XLA's compilation of an identical program is skipped. The
cache is a fresh temporary directory per process (each xdist worker), removed at exit: nothing
carries over between runs and two workers never share a file. Subprocesses started by tests do
not inherit it.

References:
  JAX documentation, "Persistent compilation cache",
  https://docs.jax.dev/en/latest/persistent_compilation_cache.html
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import jax

_CACHE_DIR = tempfile.mkdtemp(prefix="mtl_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# Programs that compile in under 0.2 s are cheaper to recompile than to serialize.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
