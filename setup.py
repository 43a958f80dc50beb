from setuptools import find_packages, setup

# Installed import names live under one namespace, `refseg` (refseg.core, refseg.cache, ...), so a
# user's own `cache/` folder or PyPI's `cache`/`extract`/`study` distributions cannot shadow them;
# the repository keeps the design card's top-level folders, mapped here folder -> package.
FOLDERS = {"refseg.core": "refseg_core", "refseg.backbones": "backbones", "refseg.cache": "cache",
           "refseg.extract": "extract", "refseg.heads": "heads", "refseg.study": "study"}


def namespaced_packages() -> list[str]:
    found = []
    for package, folder in FOLDERS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(
    name="refseg",
    version="0.1.0",
    description="Referring image segmentation from a frozen text-to-image diffusion backbone (VPD-style), with a Zarr feature cache.",
    python_requires=">=3.10",
    packages=namespaced_packages(),
    package_dir=FOLDERS,
    include_package_data=True,
    package_data={"refseg.backbones": ["assets/*", "assets/**/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        "transformers>=4.40",
        "h5py",
        "zarr>=3.1",
        "scikit-learn",
        "pycocotools",
        "click>=8",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyyaml",  # refseg-sweep's GRID.yaml (yaml.safe_load only)
        "tensorstore>=0.1.86",  # the store's data engine (cache/engine.py; docs/DESIGN.md §6 says why)
        "crc32c>=2.4",  # checksums of direct shard reads (cache/fastread.py): releases the GIL; docs/DESIGN.md §6
    ],
    # moto[server] + s3fs: the object-store tests run against moto's S3 server on 127.0.0.1 (tests/test_s3.py).
    # s3fs has a lower bound: without it pip settles moto's newest boto3 with a 2020 s3fs (0.4) that reads
    # no zarr v3 store, rather than an older boto3 with today's s3fs
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "tensorboard", "moto[server]>=5", "s3fs>=2025.1"],
                    "tensorboard": ["tensorboard"], "s3": ["s3fs>=2025.1"]},
    entry_points={
        "console_scripts": [
            "refseg-data=refseg.core.data_cli:main",
            "refseg-cache=refseg.cache.cli:main",
            "refseg-extract=refseg.extract.cli:main",
            "refseg-train-head=refseg.heads.cli_train:main",
            "refseg-eval=refseg.heads.cli_eval:main",
            "refseg-sweep=refseg.heads.cli_sweep:main",
            "refseg-compare=refseg.heads.cli_compare:main",
            "refseg-report=refseg.study.cli:main",
            "refseg-import=refseg.study.cli_import:main",
            "refseg-predict=refseg.study.cli_predict:main",
            "refseg-probe=refseg.study.cli_probe:main",
        ],
    },
)
