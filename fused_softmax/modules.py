"""nn.Module drop-ins: subclasses of torch's, so isinstance checks, state dicts and repr carry over."""

import torch

from .functional import log_softmax, softmax


class Softmax(torch.nn.Softmax):
    """Drop-in for ``torch.nn.Softmax`` running ``fused_softmax.softmax``."""

    def forward(self, input):
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """Drop-in for ``torch.nn.LogSoftmax`` running ``fused_softmax.log_softmax``."""

    def forward(self, input):
        return log_softmax(input, self.dim, _stacklevel=5)
