"""Stage report: tables and figures from experiments/ alone; closes the MLflow session run."""

from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.report import render

render.main(P.load().report_settings())
tracking.finish_session()
