"""Teacher signals: what a student is distilled towards, as the trainers consume it.

A teacher signal owns everything that differs between kinds of teachers, so that a trainer never asks which kind
it has (:class:`TeacherSignal` is the interface):

* :class:`OnlineTeacher`: a teacher model run at every step, in any placement (a device, ZeRO-3, FSDP, 4/8-bit);
* :class:`CachedTeacher`: the teacher's top-k distributions read from an offline cache (``llmkd cache-teacher``);
* :class:`ServedTeacher`: the teacher's top-k log-probabilities of each batch from an inference server
  (docs/SERVED_TEACHERS.md);
* :class:`MultiTeacher`: several of the above, each row routed to one by a dataset column or all mixed by weight
  (docs/MULTI_TEACHER.md);
* :class:`CrossTokenizerTeacher`: a local teacher model with another tokenizer (aligned spans,
  docs/CROSS_TOKENIZER.md).
"""

from .base import TeacherSignal
from .cached import CACHE_ROW, CachedTeacher
from .cross_tokenizer import CrossTokenizerTeacher
from .online import OnlineTeacher
from .multi import MultiTeacher, NamedTeacher
from .served import ServedTeacher

__all__ = ["CACHE_ROW", "CachedTeacher", "CrossTokenizerTeacher", "MultiTeacher", "NamedTeacher", "OnlineTeacher",
           "ServedTeacher", "TeacherSignal"]
