"""nn.Module drop-ins: subclasses of torch's, so isinstance checks, state dicts and repr carry over."""

import torch

from ._runtime import Unscriptable
from .functional import log_softmax, softmax


class Softmax(Unscriptable, torch.nn.Softmax):
    """Drop-in for ``torch.nn.Softmax`` running ``fused_softmax.softmax``."""

    def forward(self, input):
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(Unscriptable, torch.nn.LogSoftmax):
    """Drop-in for ``torch.nn.LogSoftmax`` running ``fused_softmax.log_softmax``."""

    def forward(self, input):
        return log_softmax(input, self.dim, _stacklevel=5)
