"""F1 score as an ``evaluate`` metric module: 2PR/(P+R) per class, averaged (macro by default).

Load it offline with ``evaluate.load(hf_merge.evaluation.metric_path("merge_f1"))``.
"""

import datasets
import evaluate

from hf_merge.evaluation import f1_score

_DESCRIPTION = "F1 score of single-label classification, averaged over classes (macro, weighted or micro)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class indices.
    references (list of int): true class indices.
    average (str): "macro" (default), "weighted" or "micro".
Returns:
    f1 (float): in [0, 1].
Examples:
    >>> metric = evaluate.load(hf_merge.evaluation.metric_path("merge_f1"))
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""


class MergeF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="macro"):
        return {"f1": f1_score(predictions, references, average=average)}
