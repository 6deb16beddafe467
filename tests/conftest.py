"""Test setup: 8 fake CPU devices so sharded code paths run."""
import os
import sys

# Optimization level 0: XLA's CPU compiles take a third of the time, and the
# tests' programs are tiny (benchmarks never use this).
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8 ' + FAST_COMPILE).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
