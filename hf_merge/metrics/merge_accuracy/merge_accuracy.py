"""Accuracy as an ``evaluate`` metric module: the fraction of predictions equal to the reference class.

Load it offline with ``evaluate.load(hf_merge.evaluation.metric_path("merge_accuracy"))``.
"""

import datasets
import evaluate

from hf_merge.evaluation import accuracy

_DESCRIPTION = "Accuracy: the fraction of predicted class indices equal to the reference class indices."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class indices.
    references (list of int): true class indices.
Returns:
    accuracy (float): in [0, 1].
Examples:
    >>> metric = evaluate.load(hf_merge.evaluation.metric_path("merge_accuracy"))
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class MergeAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"accuracy": accuracy(predictions, references)}
