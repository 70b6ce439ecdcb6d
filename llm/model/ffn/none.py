"""The feed-forward kind `ffn: none`: no feed-forward sublayer, so the layer is its mixer alone, x + mixer(norm(x)),
as every layer of a Mamba stack. The block leaves out its second norm and residual add for it."""
from ..kinds import FeedForward, FFNKind


class NoFeedForward(FeedForward):
    """No parameters and nothing to compute: `Block` skips its feed-forward sublayer when its ffn is this module."""


NONE = FFNKind("none", lambda block, config: NoFeedForward(), examples={"none": dict(ffn="none")})
