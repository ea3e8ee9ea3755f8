"""``modelhive bench serve``: an HTTP load generator for a running server (like ``vllm bench
serve``): workloads and patterns (``patterns.py``), the async sender (``generator.py``), pool
occupancy from ``/metrics`` (``occupancy.py``), statistics and the report (``report.py``), the
command line (``command.py``)."""
