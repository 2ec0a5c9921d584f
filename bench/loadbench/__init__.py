"""The load benchmark's parts (driven by bench/load_bench.py): processes and CPU accounting, the C tools,
traffic files, targets, measurement, scenarios and the plot. See bench/README.md."""
