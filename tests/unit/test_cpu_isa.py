"""vLLM CPU on an x86 host without AVX-512 loads kernels that have no 4-bit GEMM: vtune must
know it before launching (the spec says AWQ/GPTQ do not run) and, if launched anyway, call the
failure what it is (unsupported), not a load crash."""

from __future__ import annotations

from tuner.engine.log import FailureClass, classify_failure

# The tail of a real vLLM CPU 0.32 start-up with an AWQ checkpoint on an AVX2-only host.
AVX2_AWQ_LOG = """\
(Worker pid=17066) ERROR 11-29 16:58:58 [multiproc_executor.py:1063]     raise AttributeError(
(Worker pid=17066) ERROR 11-29 16:58:58 [multiproc_executor.py:1063] AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'
(Worker pid=17066) ERROR 11-29 16:58:58 [multiproc_executor.py:1063] torch._dynamo.exc.ObservedAttributeError
(EngineCore pid=16770) ERROR 11-29 16:58:58 [core.py:1510] RuntimeError: Worker failed with error 'Observed exception
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""  # noqa: E501


def test_a_missing_kernel_is_unsupported_not_a_load_crash() -> None:
    cls, message = classify_failure(AVX2_AWQ_LOG)
    assert cls is FailureClass.UNSUPPORTED
    assert "cpu_gemm_wna16" in message and "\\n" not in message
