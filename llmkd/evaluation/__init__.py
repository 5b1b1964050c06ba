"""Evaluating distilled students: lm-eval benchmarks on model objects (llmkd's offline tasks in ``eval/tasks`` and
any lm-eval task), ``evaluate`` accuracy/F1 for classifiers, the teacher's scores and the retention ratio.

    from llmkd.evaluation import evaluate_models, evaluate_paths
    results = evaluate_paths("outputs/kd-tiny", "llmkd_addition_exact_match,llmkd_addition_choice",
                             teacher="llmkd/assets/quickstart/teacher", limit=50)

See docs/EVALUATION.md.
"""

from .results import markdown_table, read_results, retention, retention_ratio, write_results
from .run import EVAL_SPLIT_TASK, evaluate_after_training, evaluate_models, evaluate_paths, score_model
from .tasks import EvaluationError, local_classification_tasks, local_lm_tasks, parse_task_list, validate_tasks

__all__ = [
    "EVAL_SPLIT_TASK", "EvaluationError", "evaluate_after_training", "evaluate_models", "evaluate_paths",
    "local_classification_tasks", "local_lm_tasks", "markdown_table", "parse_task_list", "read_results",
    "retention", "retention_ratio", "score_model", "validate_tasks", "write_results",
]
