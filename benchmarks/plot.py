"""PNG plots from the benchmark CSVs (benchmarks/results/bench_*.csv): see fastddpm/bench/plot.py.

    python benchmarks/plot.py [--timings CSV] [--counts CSV] [--out DIR] [--run RUN_ID]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench.plot import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
