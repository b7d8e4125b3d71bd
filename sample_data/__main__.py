"""``python -m sample_data OUTDIR [--seed N] [--spacing fine|standard|coarse|demo]``: write a
phantom DICOM study (plus truth.json) to OUTDIR."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from sample_data.phantom import demo_spec, spacing_specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sample_data", description=__doc__)
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=None, help="seed (default 0; demo: 7)")
    ap.add_argument("--spacing", choices=["fine", "standard", "coarse", "demo"], default="demo")
    ap.add_argument("--noise-hu", type=float, default=None)
    ap.add_argument("--no-streaks", action="store_true")
    ap.add_argument("--feet-first", action="store_true")
    ap.add_argument("--no-extra-series", action="store_true",
                    help="write only the bone series (no localizer, no soft-tissue series)")
    args = ap.parse_args(argv)
    if args.spacing == "demo":
        spec = demo_spec()
        if args.seed is not None:
            spec = replace(spec, seed=args.seed)
    else:
        spec = spacing_specs(0 if args.seed is None else args.seed)[args.spacing]
    if args.noise_hu is not None:
        spec = replace(spec, noise_hu=args.noise_hu)
    if args.no_streaks:
        spec = replace(spec, streaks=False)
    if args.feet_first:
        spec = replace(spec, feet_first=True)
    from sample_data.dicom_writer import write_dicom_study

    t0 = time.perf_counter()
    out = write_dicom_study(spec, args.outdir, extra_series=not args.no_extra_series)
    print(f"sample_data: study written to {out} in {time.perf_counter() - t0:.1f} s "
          f"(truth in {out / 'truth.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
