"""Privacy-utility studies: a grid of simulate runs in parallel, resumable, with tables and plots."""

from privfer.study.report import collect, markdown_table, write_report
from privfer.study.runner import CellOutcome, run_study
from privfer.study.spec import Cell, StudySpec, expand, load_spec

__all__ = ["Cell", "CellOutcome", "StudySpec", "collect", "expand", "load_spec", "markdown_table", "run_study",
           "write_report"]
