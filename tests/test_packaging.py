"""The top-level `kernels/` and `models/` folders never shadow an installed
package of the same name, whatever the working directory, and
`distkv_jax.kernels` / `distkv_jax.models` resolve from a source checkout, the
editable install and a wheel.

Each check runs in a fresh interpreter started from the repository root, where
Python puts the working directory first on `sys.path` (as `python -m pytest`
and `python -m distkv_jax...` do).
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *, cwd: str, flags: tuple[str, ...] = (), pythonpath: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _transformers_modules_importing_kernels() -> list[str]:
    """The transformers modules that do `from kernels import ...` (the
    module moves between releases, so look rather than name one)."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    base = os.path.dirname(spec.origin)
    found = []
    for dirpath, _, files in os.walk(base):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                if "from kernels import" not in f.read():
                    continue
            rel = os.path.relpath(path, os.path.dirname(base))[:-3].replace(os.sep, ".")
            found.append(rel.removesuffix(".__init__"))
    return sorted(found)


def test_installed_hf_kernels_wins_over_our_folder_from_the_repo_root():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` package is not installed")
    modules = _transformers_modules_importing_kernels()
    code = "\n".join([
        "import kernels",
        "print(kernels.__file__)",
        *(f"import {m}" for m in modules),
    ])
    proc = _python(code, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = os.path.realpath(proc.stdout.split()[0])
    assert where.startswith(os.path.realpath(str(dist.locate_file("")))), where
    assert not where.startswith(os.path.join(os.path.realpath(ROOT), "kernels") + os.sep), where


def test_a_regular_package_on_sys_path_wins_over_our_folders(tmp_path):
    for name in ("kernels", "models"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'fake {name}'\n")
    proc = _python("import kernels, models; print(kernels.WHO, '|', models.WHO)",
                   cwd=ROOT, pythonpath=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "fake kernels | fake models"


_RESOLVE = """
import importlib.util, os
for name in ("distkv_jax.kernels.native", "distkv_jax.kernels.micro_attention",
             "distkv_jax.models.tiny", "distkv_jax.models.llama"):
    spec = importlib.util.find_spec(name)
    print(os.path.realpath(spec.origin))
import distkv_jax.kernels as k
print(os.path.realpath(os.path.join(list(k.__path__)[0], "micro_attention_cpu.cc")))
"""


def _check_resolved(proc, base: str):
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = proc.stdout.split()
    assert len(paths) == 5
    for path in paths:
        assert path.startswith(os.path.realpath(base) + os.sep), (path, base)
        assert os.path.isfile(path), path


def test_subpackages_resolve_from_a_source_checkout():
    # -S: no site-packages, so nothing but the checkout itself can answer
    _check_resolved(_python(_RESOLVE, cwd=ROOT, flags=("-S",)), ROOT)


def test_subpackages_resolve_from_the_editable_install(tmp_path):
    _check_resolved(_python(_RESOLVE, cwd=str(tmp_path)), ROOT)


def test_subpackages_resolve_from_a_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("distkv_jax", "kernels", "models"):
        shutil.copytree(os.path.join(ROOT, name), src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                           str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("distkv_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("distkv_jax/kernels/native.py", "distkv_jax/kernels/micro_attention_cpu.cc",
                     "distkv_jax/kernels/cpu_vec.h", "distkv_jax/models/llama.py"):
        assert expected in names, expected
    assert not any(n.startswith(("kernels/", "models/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S and PYTHONPATH=site: only the unpacked wheel can answer
    _check_resolved(_python(_RESOLVE, cwd=str(tmp_path), flags=("-S",), pythonpath=str(site)),
                    str(site))
