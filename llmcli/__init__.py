"""llmcli: run, convert and size large language models on your own machine."""

import os

# libgomp (torch's OpenMP) reads this once, when torch is first imported, so it is set here, before any of our
# modules imports torch; a value the user exported wins. Its default lets idle OpenMP workers spin between
# parallel regions; a batch-1 decode step is ~120 parallel kernels of 20-500 us with Python in between, and when
# another process shares the cores (measured on a loaded 2-core AVX2 EPYC, benchmarks/decode_profile.py --threads
# 2) every region then waits for a descheduled spinner: 1,191 ms per step at 2 threads against 45 ms at 1.
# PASSIVE (workers sleep at once): 48 ms at 2 threads. README "CPU decode".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
