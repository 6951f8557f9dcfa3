"""The command line of `python -m nas_kd.report --study-name NAME`: rebuild a study's report.html
and trials.csv from its storage (`nas_kd.reporting.html`)."""

from __future__ import annotations

import sys
from pathlib import Path

from nas_kd.cli import fail, quiet_libraries, study_parser
from nas_kd.core.errors import InputError
from nas_kd.nas.study import load_existing
from nas_kd.reporting.html import write_report


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("python -m nas_kd.report", "Rebuild a study's report.html and trials.csv from its storage.")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        study = load_existing(args.storage, args.study_name, Path(args.out_dir))
        html_path, csv_path = write_report(study, Path(args.out_dir) / args.study_name)
    except InputError as e:
        return fail(str(e))
    print(f"report: {html_path}\ntrials: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
