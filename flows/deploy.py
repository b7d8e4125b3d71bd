"""Serve fusionct's flows as Prefect deployments, so staff launch them from the UI or CLI.

    python -m flows.deploy [--limit 2]

serves two deployments from this process (``prefect.serve``; each run is a subprocess):

- ``fusionct-analyze/analyze`` with parameters ``input_path``, ``outdir``, ``config_path``:
  ``prefect deployment run fusionct-analyze/analyze -p input_path=/data/study -p outdir=/results/x``
- ``fusionct-batch/batch`` with parameters ``studies`` (list), ``out_root``, ``config_path``,
  ``address`` (a Dask scheduler; a LocalCluster of ``n_workers`` without it):
  ``prefect deployment run fusionct-batch/batch -p 'studies=["/data/inbox"]' -p out_root=/results``

Point ``PREFECT_API_URL`` at the department's Prefect server first (see the README);
without it Prefect's ephemeral server is used and the deployments live only as long as
this process. ``fusionct serve`` can hand each received study to the analyze deployment:
set ``FUSIONCT_DEPLOYMENT=fusionct-analyze/analyze``.
"""
from __future__ import annotations

import argparse
import os
import sys

ANALYZE = "fusionct-analyze/analyze"
BATCH = "fusionct-batch/batch"


def deployments(limit_per_deployment: int | None = None):
    """The two runner deployments (module entrypoints, so any working folder works)."""
    from prefect.deployments.runner import EntrypointType

    from flows.analyze import analyze_flow
    from flows.batch import batch_flow
    from pipeline import __version__

    common = dict(tags=["fusionct"], version=__version__, entrypoint_type=EntrypointType.MODULE_PATH)
    analyze = analyze_flow.to_deployment(
        name="analyze", concurrency_limit=limit_per_deployment,
        description="Analyze one post-fusion lumbar CT study (DICOM folder or NIfTI file) "
                    "and write measurements.json, CSVs, report.html and the SR to outdir.",
        **common)
    batch = batch_flow.to_deployment(
        name="batch",
        description="Analyze many studies across a Dask cluster (address) or a LocalCluster; "
                    "results in out_root/<StudyInstanceUID>/.",
        **common)
    return [analyze, batch]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=2, help="flow runs executed at once by this process")
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import serve

    serve(*deployments(limit_per_deployment=args.limit), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
