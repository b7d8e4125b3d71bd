"""The ``fusionct`` console script (CONTRACT.md "Commands").

Exit status: 0 analyzed; 2 the input cannot be analyzed; 1 an internal error. On 1 and 2
one plain line goes to stderr (no traceback unless ``--debug``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


#: Loggers of Prefect's queue services (``prefect._internal.concurrency.services``), named
#: after their classes rather than under ``prefect``.
PREFECT_SERVICE_LOGGERS = ("EventsWorker", "APILogWorker")


def _quiet_prefect(debug: bool) -> None:
    """Keep Prefect's own logs and telemetry out of the way; our progress lines say enough."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server takes seconds to start, more on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG" if debug else "CRITICAL")
    # the embedded server's services log under prefect.server at this level (WARNING by
    # default, apart from PREFECT_LOGGING_LEVEL): shutting it down mid-flush after a refused
    # input printed a 60-line traceback after the one error line
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING" if debug else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "fusionct" / "numba"))


def _fail(exc: BaseException, debug: bool) -> int:
    from pipeline.errors import InputError, one_line

    if debug:
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, InputError):
        print(f"fusionct: cannot analyze {exc}", file=sys.stderr)
        return 2
    print(one_line(f"fusionct: internal error: {type(exc).__name__}: {exc}".splitlines()[0]), file=sys.stderr)
    return 1


def no_heartbeats_without_server():
    """A context without Prefect's flow-run heartbeats when no Prefect server is configured.

    Heartbeats let a Prefect server notice a flow run whose process died. Without
    ``PREFECT_API_URL`` the flow talks to a temporary server inside this very process, which
    dies with it: nobody can use them. They are not free: Prefect emits the first one as the
    run starts and, at its end, waits for the heartbeat thread's one-second sleep to run out
    (0.4-0.5 s against 1.9 s for a trivial flow, measured on the 2-core machine). With a
    server configured they stay on.
    """
    import contextlib

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def run_analysis(input_path: str, outdir: str, config_path: str | None = None,
                 baseline: str | None = None, show_progress: bool = True) -> Path:
    """Run the Prefect analysis flow on one study and return the folder written."""
    from flows.analyze import analyze_flow
    from flows.progress import Progress, set_progress

    set_progress(Progress(enabled=show_progress))
    kwargs = {"config_path": config_path}
    if baseline is not None:
        kwargs["baseline_path"] = baseline
    with no_heartbeats_without_server():
        return Path(analyze_flow(str(input_path), str(outdir), **kwargs))


def check_outdir(outdir: str) -> None:
    """Refuse an OUTDIR that cannot take files before any work starts (exit 2, one line).

    Results are staged beside OUTDIR and renamed into it, so OUTDIR (when it exists) and the
    folder it lives in must both accept a new entry; a probe folder is made and removed.
    """
    import tempfile

    from pipeline.errors import InputError

    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "OUTDIR exists and is not a folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    for folder in ([out] if out.is_dir() else []) + [parent]:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".fusionct-probe-", dir=folder))
        except OSError as e:
            raise InputError(out, f"OUTDIR cannot be written ({e.strerror or type(e).__name__})") from None


def cmd_analyze(args) -> int:
    check_outdir(args.output)
    written = run_analysis(args.input, args.output, args.config, args.baseline)
    print(f"fusionct: results written to {written}")
    return 0


def cmd_demo(args) -> int:
    from sample_data import demo_spec, write_dicom_study

    out = Path(args.output)
    study = out / "sample_study"
    if not (study / "truth.json").exists():
        print(f"fusionct: making the sample study in {study}", file=sys.stderr)
        write_dicom_study(demo_spec(), study)
    written = run_analysis(str(study), str(out / "results"))
    print(f"fusionct: results written to {written}")
    print(f"fusionct: open {written / 'report.html'} or run: fusionct review {written}")
    return 0


def cmd_review(args) -> int:
    from pipeline.review import serve

    serve(args.outdir, host=args.host, port=args.port)
    return 0


def cmd_serve(args) -> int:
    from flows.service import serve

    serve(port=args.port, ae_title=args.ae_title, watch=args.watch, out_root=args.out_root,
          host=args.host, allowed_aes=args.allow_ae, quiet_s=args.quiet_seconds)
    return 0


def cmd_bench(args) -> int:
    from benchmarks.run import main as bench_main

    return bench_main(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionct", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks and Prefect logs")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="analyze one study (DICOM folder or NIfTI file)")
    a.add_argument("input")
    a.add_argument("-o", "--output", required=True, help="output folder (OUTDIR)")
    a.add_argument("--baseline", help="an earlier study of the same patient (PRIOR)")
    a.add_argument("--config", help="JSON or TOML file overriding defaults")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("demo", help="make the bundled sample study and analyze it")
    d.add_argument("-o", "--output", default="fusionct_output")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="DICOM C-STORE receiver / watched folder that analyzes each complete study")
    s.add_argument("--port", type=int, default=11112)
    s.add_argument("--ae-title", default="FUSIONCT")
    s.add_argument("--watch", help="a folder to watch for new studies")
    s.add_argument("--out-root", default="fusionct_results")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--allow-ae", action="append", help="accept only these calling AE titles (repeat)")
    s.add_argument("--quiet-seconds", type=float, default=10.0,
                   help="a study is complete after this long without a new instance")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("review", help="serve the surgeon's confirmation page for one analyzed study")
    r.add_argument("outdir")
    r.add_argument("--port", type=int, default=8765)
    r.add_argument("--host", default="127.0.0.1")
    r.set_defaults(func=cmd_review)

    b = sub.add_parser("bench", help="kernel and end-to-end benchmarks")
    b.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_prefect(args.debug)
    if not args.debug:
        logging.getLogger("prefect").setLevel(logging.CRITICAL)
        # Prefect's background services log under their class names (outside "prefect"), e.g.
        # "Still processing items" when the process exits before its events are sent: that
        # came after the one error line on a refused input, one run in four
        for service in PREFECT_SERVICE_LOGGERS:
            logging.getLogger(service).setLevel(logging.CRITICAL)
        # pydicom logs a decoder's traceback at ERROR before raising; the one line says it
        import pydicom  # noqa: F401 - importing pydicom sets its logger's level: quiet it after
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fusionct: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract wants one line, not a traceback
        return _fail(exc, args.debug)


if __name__ == "__main__":
    sys.exit(main())
