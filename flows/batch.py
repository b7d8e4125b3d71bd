"""Analyze many studies across a Dask cluster (prefect-dask's ``DaskTaskRunner``).

One ``analyze-study`` task per study is spread over the cluster's workers; inside it the
usual analysis flow runs as a nested flow run, so every study keeps its own flow run (with
its cached load/detect/measure steps and per-screw tasks) in the Prefect UI, and results
land in ``OUT_ROOT/<StudyInstanceUID>/`` exactly as ``fusionct serve`` puts them.

The cluster is either an existing ``dask.distributed`` scheduler given by address
(``tcp://host:8786``) or a ``LocalCluster`` made for the run. Workers must see the input
folders, OUT_ROOT and ``FUSIONCT_CACHE_DIR`` at the same paths (one machine, or shared
storage). Run: ``python -m flows.batch STUDIES... -o OUT_ROOT [--address A | --workers N]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.service import safe_name


# ----------------------------------------------------------------------------- planning
def study_uid_of(path: Path) -> str | None:
    """The Study Instance UID of the first readable DICOM file under ``path`` (None if none)."""
    import pydicom

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM; keep looking
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    return None


def expand_studies(inputs) -> list[Path]:
    """Each input is a study, or a folder whose sub-folders / NIfTI files are the studies.

    A folder holding files directly is one study; a folder holding only sub-folders (and
    NIfTI files) is a collection of studies.
    """
    studies: list[Path] = []
    for raw in ([inputs] if isinstance(inputs, (str, Path)) else inputs):
        p = Path(raw)
        if p.is_dir() and not any(c.is_file() and not c.name.endswith((".nii", ".nii.gz"))
                                  for c in p.iterdir()):
            studies.extend(sorted(c for c in p.iterdir() if c.is_dir() or c.name.endswith((".nii", ".nii.gz"))))
        else:
            studies.append(p)
    return studies


def plan_outdirs(studies: list[Path], out_root: Path) -> list[Path]:
    """``OUT_ROOT/<StudyInstanceUID>`` per study (the file stem for NIfTI); never two alike."""
    seen: dict[str, int] = {}
    outdirs = []
    for s in studies:
        uid = study_uid_of(s) if s.exists() else None
        stem = s.name.removesuffix(".gz").removesuffix(".nii") if uid is None else uid
        name = safe_name(stem)
        seen[name] = seen.get(name, 0) + 1
        outdirs.append(out_root / (name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return outdirs


# ----------------------------------------------------------------------------- tasks
@task(name="analyze-study", task_run_name="analyze-study-{outdir_name}", cache_policy=NO_CACHE)
def analyze_study_task(input_path: str, outdir: str, outdir_name: str,
                       config_path: str | None = None) -> dict:
    """One study on one Dask worker: the analysis flow as a nested flow run."""
    from flows.analyze import analyze_flow

    worker = None
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    t0 = time.perf_counter()
    written = analyze_flow.with_options(flow_run_name=f"batch-{outdir_name}")(
        input_path=input_path, outdir=outdir, config_path=config_path)
    return {"input": input_path, "outdir": written, "worker": worker,
            "seconds": round(time.perf_counter() - t0, 2)}


def _api_url() -> str | None:
    """The API this run talks to, so Dask workers report to it instead of starting their own."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_runner(address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1):
    """A ``DaskTaskRunner`` on the scheduler at ``address``, else on a new ``LocalCluster``."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": int(n_workers),
                                          "threads_per_worker": int(threads_per_worker),
                                          "processes": True, "dashboard_address": None})


@flow(name="fusionct-batch-on-dask")
def _batch_on_dask(studies: list[str], out_root: str, config_path: str | None = None) -> list[dict]:
    """The batch itself; its task runner (the Dask cluster) is chosen by ``batch_flow``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    paths = expand_studies(studies)
    outdirs = plan_outdirs(paths, Path(out_root))
    with temporary_settings(updates={PREFECT_API_URL: _api_url()}):
        futures = [analyze_study_task.submit(str(p), str(o), o.name, config_path)
                   for p, o in zip(paths, outdirs)]
    rows = []
    for p, o, fut in zip(paths, outdirs, futures):
        fut.wait()
        try:
            rows.append({**fut.result(), "state": "done"})
        except Exception as exc:  # noqa: BLE001 - reported per study, the others go on
            rows.append({"input": str(p), "outdir": str(o), "state": "failed",
                         "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
    return rows


@flow(name="fusionct-batch")
def batch_flow(studies: list[str], out_root: str, config_path: str | None = None,
               address: str | None = None, n_workers: int = 2) -> list[dict]:
    """Analyze many studies across a Dask cluster; one summary row per study.

    Parameters
    ----------
    studies : list of str
        Study folders / NIfTI files, or folders of them (see ``expand_studies``).
    out_root : str
        Results go to ``out_root/<StudyInstanceUID>/``.
    config_path : str, optional
        Config overrides for every study.
    address : str, optional
        An existing Dask scheduler (``tcp://host:8786``); without it a ``LocalCluster``
        of ``n_workers`` single-threaded worker processes is made for this run.
    n_workers : int
        Workers of that ``LocalCluster``.

    A study that fails is reported in its row (``state``/``error``) and does not stop the
    others.
    """
    runner = dask_runner(address, n_workers)
    return _batch_on_dask.with_options(task_runner=runner)(studies=list(map(str, studies)),
                                                           out_root=str(out_root), config_path=config_path)


def run_batch(studies, out_root, config_path: str | None = None, address: str | None = None,
              n_workers: int = 2) -> list[dict]:
    """Plain-call entry: ``batch_flow`` over ``studies`` (a path or a list of paths)."""
    studies = [studies] if isinstance(studies, (str, Path)) else list(studies)
    return batch_flow(studies=[str(s) for s in studies], out_root=str(out_root),
                      config_path=config_path, address=address, n_workers=n_workers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.batch", description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", help="study folders / NIfTI files, or folders of them")
    p.add_argument("-o", "--out-root", required=True)
    p.add_argument("--config")
    p.add_argument("--address", help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (without --address)")
    args = p.parse_args(argv)
    rows = run_batch(args.studies, args.out_root, args.config, args.address, args.workers)
    print(json.dumps(rows, indent=2))
    return 0 if all(r["state"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
