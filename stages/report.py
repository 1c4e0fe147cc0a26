"""Stage report: reports/ and the headline metrics.json from experiments/; closes the MLflow run."""

from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.report import metrics, render
from lab.report.load import ReportSettings

params = P.load()
# Built here, not in lab.pipeline.params, which every stage imports: only this stage may depend on
# lab/report, so that editing the report re-runs nothing else.
settings = ReportSettings(seed=params.seed, bootstrap_samples=params.report.bootstrap_samples,
                          draft=params.models.draft, scorer=params.models.scorer,
                          planned=params.run_settings())  # fmt: skip
with tracking.final_stage():  # ends the MLflow parent run: FAILED if the report raised
    render.main(settings)
    metrics.main()  # the one DVC metrics file: what `dvc exp show` lists
