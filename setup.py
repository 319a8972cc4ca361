from setuptools import find_packages, setup

setup(
    name="composer_prx",
    version="0.1.0",
    description="The PRX 24-hour text-to-image recipe as MosaicML Composer algorithms and callbacks",
    packages=find_packages(include=["composer_prx", "composer_prx.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.7.0",
        "torchvision==0.22.0",
        "mosaicml==0.32.1",
        "mosaicml-streaming==0.13.0",
        "numpy>=1.26,<2.2",
        "transformers>=4.56,<5",
        "lpips==0.1.4",
        "timm>=1.0.20",  # DINOv3 ViTs
        "omegaconf>=2.3",
        "pillow>=10",
        "scipy>=1.10",
        "pyarrow>=14",
        "matplotlib>=3.7",  # composer_prx.report's curves (Agg backend)
    ],
    extras_require={
        # diffusers 0.39.0: the newest release beside transformers<5 (0.40+ needs huggingface-hub>=1.23);
        # PRXPixelPipeline cleans prompts with ftfy
        "diffusers": ["diffusers==0.39.0", "ftfy>=6"],
        "test": ["pytest>=8", "moto[server]>=5", "diffusers==0.39.0", "ftfy>=6"],
    },
)
