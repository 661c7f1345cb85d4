"""The validator's tool: judge one job's result independently, then sign the receipt that settles it.

:func:`validate` is the whole of it (see :mod:`validator.validate`); its steps are public for tests and
for callers that take them one at a time:

- :mod:`validator.fetch`: the node's signed job and result, the envelope, the input and the artifact,
  each verified before use;
- :mod:`validator.transcode` and :mod:`validator.batch`: an ``ffmpeg_transcode`` or ``vllm_batch``
  result re-checked, as a :class:`Judgement`;
- :mod:`validator.validate`: the funding terms checked, the EIP-712 receipt signed and posted, the
  :class:`ValidationReport`.

The receipt's W3C Verifiable Credential is :mod:`payments.credentials`'s.

:mod:`validator.service` runs the same :func:`validate` as a daemon (``hearth validator run``): node-signed
notices in, verdicts kept in :mod:`validator.verdicts` (one receipt per job, whatever crashes), receipts
posted and retried while a node is unreachable.
"""

from validator.batch import judge_batch
from validator.fetch import (
    MIB,
    SignedJob,
    fetch_artifact,
    fetch_job_input,
    fetch_signed_job,
    job_envelope,
    unpack_artifact,
    verify_signed_document,
)
from validator.judgement import Judgement
from validator.transcode import judge_transcode
from validator.validate import (
    ValidationReport,
    check_terms,
    funding_terms,
    judge,
    receipt_amount,
    receipt_body,
    sign_verdict,
    validate,
)

__all__ = [
    "MIB",
    "Judgement",
    "SignedJob",
    "ValidationReport",
    "check_terms",
    "fetch_artifact",
    "fetch_job_input",
    "fetch_signed_job",
    "funding_terms",
    "job_envelope",
    "judge",
    "judge_batch",
    "judge_transcode",
    "receipt_amount",
    "receipt_body",
    "sign_verdict",
    "unpack_artifact",
    "validate",
    "verify_signed_document",
]
