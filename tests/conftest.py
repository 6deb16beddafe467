"""Test setup: 8 fake CPU devices so sharded code paths run, and one XLA
compilation cache for the whole session."""
import atexit
import os
import shutil
import sys
import tempfile

# Optimization level 0: XLA's CPU compiles take a third of the time, and the
# tests' programs are tiny. It only changes LLVM code generation, not the HLO
# passes (benchmarks/memory_plan.py uses it for that reason; timed benchmarks do not).
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8 ' + FAST_COMPILE).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests start `python -m internseg_jax.main` for the same tiny models (train,
# kill, resume, ...): a persistent compilation cache, inherited by those
# subprocesses through the environment, lets each program compile once per
# session. It changes no result (the same executables run); it is removed at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='internseg_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
