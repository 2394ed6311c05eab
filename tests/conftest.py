"""Test set-up: 8 simulated CPU devices, requested before JAX initializes."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop compiled programs after each test module: XLA:CPU maps each one's
    code into many memory mappings, and one process may hold at most
    vm.max_map_count (65530) of them."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
