"""Installed import names live under `refseg.*`: a user's `cache/` folder cannot shadow them (issue 15, item 1)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API = ("from refseg.heads import train, evaluate; from refseg.cache import FeatureDataset, open_cache; "
       "import refseg.extract.pipeline, refseg.core.refer, refseg.study.demo; "
       "import refseg.cache; print(refseg.cache.__file__)")


def _shadowing_folders(root: Path) -> None:
    """What an ML project folder often holds: its own cache/, extract/, heads/ and study/ packages."""
    for name in ("cache", "extract", "heads", "study", "refseg_core"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text("raise ImportError('the user\\'s own folder was imported')\n")


def test_the_api_works_from_a_folder_holding_a_cache_package(tmp_path):
    _shadowing_folders(tmp_path)
    result = subprocess.run([sys.executable, "-c", API], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == REPO / "cache" / "__init__.py"  # the editable install


def test_a_wheel_installs_every_package_under_refseg_only(tmp_path):
    # built from a copy: setuptools builds in the source tree, and a build/ left there would outlive its sources
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "demo-out",
                                                                "gpu-out", ".whl", "__pycache__", "*.zarr"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("refseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("refseg-")}
    assert tops == {"refseg"}
    for expected in ("refseg/cache/__init__.py", "refseg/heads/train.py", "refseg/core/refer.py",
                     "refseg/backbones/assets/tiny-synth/unet/diffusion_pytorch_model.safetensors"):
        assert expected in names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    work = tmp_path / "project"
    work.mkdir()
    _shadowing_folders(work)
    result = subprocess.run([sys.executable, "-c", API], cwd=work, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == target / "refseg" / "cache" / "__init__.py"
