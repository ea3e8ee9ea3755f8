"""Offline benchmarks (``modelhive bench``): latency, throughput, three-models; roofline and the
transformers baseline measured in the same process. See ``bench/offline.py``."""
