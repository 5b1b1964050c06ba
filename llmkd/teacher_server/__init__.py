"""Teachers behind an inference server (docs/SERVED_TEACHERS.md): :class:`TeacherServer`, the HTTP client that
asks a vLLM or SGLang server for the teacher's top-k log-probabilities of given token ids, and :class:`RowScores`, one
row's answer as arrays. The cache writer (``llmkd cache-teacher --teacher_server URL``) and the served teacher signal
(:class:`~llmkd.teacher_signals.ServedTeacher`) use them."""

from .client import PROBE_TEXTS, SERVER_APIS, TeacherServer, TeacherServerError
from .scores import RowScores, row_scores, sglang_row_scores, tail_log_prob

__all__ = ["PROBE_TEXTS", "SERVER_APIS", "RowScores", "TeacherServer", "TeacherServerError", "row_scores",
           "sglang_row_scores", "tail_log_prob"]
