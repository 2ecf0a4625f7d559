"""Data layer: one registry of datasets (CIFAR-10, digits, synthetic in memory; image folders
and ImageNet shards streamed) and one loader protocol (:mod:`mixq.data.protocol`).

Typical use::

    from mixq.data import LoaderSpec, get_dataset

    ds = get_dataset("cifar10", data_dir="~/data")
    train, test = ds.loaders(LoaderSpec(batch_size=512, eval_batch_size=1000, device="cuda"))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train: ...
"""

from mixq.data.arrays import DatasetArrays
from mixq.data.cifar10 import CifarArrays, load_cifar10
from mixq.data.digits import load_digits_arrays
from mixq.data.download import download_cifar10
from mixq.data.errors import DataError
from mixq.data.loader import TensorLoader
from mixq.data.paths import resolve_data_dir
from mixq.data.protocol import Dataset, Loader, LoaderSpec
from mixq.data.registry import DATASETS, STREAMING_DATASETS, get_dataset
from mixq.data.safe_pickle import safe_load_pickle
from mixq.data.synthetic import synthetic_arrays

__all__ = [
    "DATASETS",
    "STREAMING_DATASETS",
    "CifarArrays",
    "DataError",
    "Dataset",
    "DatasetArrays",
    "Loader",
    "LoaderSpec",
    "TensorLoader",
    "download_cifar10",
    "get_dataset",
    "load_cifar10",
    "load_digits_arrays",
    "resolve_data_dir",
    "safe_load_pickle",
    "synthetic_arrays",
]
