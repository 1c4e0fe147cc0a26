"""Stage report: tables and figures from experiments/ alone; closes the MLflow session run."""

from lab import report
from lab.pipeline import tracking

report.main()
tracking.finish_session()
