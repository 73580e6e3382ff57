"""Shared helpers of the benchmark scripts (interleaved timing, machine description, CSV rows).

They live in the package (fastddpm/bench/timing.py) so that `fastddpm bench` works from an installed
package; this module keeps the scripts' imports short.
"""

from fastddpm.bench.timing import (  # noqa: F401
    append_csv,
    copy_bandwidth,
    interleaved,
    load_average,
    machine,
    median,
    peak_tensor_bytes,
    spread,
    stamp,
    versions,
    write_csv,
)
