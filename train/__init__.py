"""The training scripts' modules (`python train/run.py` and siblings): data, models, FSDP2, metrics.

An editable install (`pip install -e .`) makes this package importable from the scripts and the
benchmarks; it is not part of the library's API, which is `epsdpo_kernels`.
"""
