"""The examples in the public docstrings run and print what they say."""

import doctest

import pytest

import epsdpo_kernels.adaptive_beta
import epsdpo_kernels.linear_loss
import epsdpo_kernels.loss


@pytest.mark.parametrize(
    "module", [epsdpo_kernels.loss, epsdpo_kernels.adaptive_beta, epsdpo_kernels.linear_loss]
)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": __import__("torch")}, verbose=False)
    assert result.attempted > 0 and result.failed == 0
