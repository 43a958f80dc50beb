from setuptools import find_packages, setup

setup(
    name="refseg",
    version="0.1.0",
    description="Referring image segmentation from a frozen text-to-image diffusion backbone (VPD-style), with a Zarr feature cache.",
    python_requires=">=3.10",
    packages=find_packages(include=["refseg_core*", "extract*", "cache*", "heads*", "study*"]),
    include_package_data=True,
    package_data={"refseg_core": ["assets/*", "assets/**/*"]},
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
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "refseg-data=refseg_core.data_cli:main",
            "refseg-cache=cache.cli:main",
            "refseg-extract=extract.cli:main",
            "refseg-train-head=heads.cli_train:main",
            "refseg-eval=heads.cli_eval:main",
            "refseg-report=study.cli:main",
        ],
    },
)
