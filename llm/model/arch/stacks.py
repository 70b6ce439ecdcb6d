"""Rules that the architectures of several stacks at their own widths and lengths (MegaByte, H-Net) share."""
from ...config import LLMconfig, Trainconfig, require
from ..registry import OBJECTIVES


def require_next_token_prediction(m: LLMconfig) -> None:
    """A causal, non-diffusion objective (each byte from the bytes before it), no multi-token heads (they read one
    stack) and no mixture-of-depths routing inside the stacks."""
    kind = OBJECTIVES[m.objective]
    require(kind.causal and not kind.diffusion, f"arch={m.arch} predicts each byte from the bytes before it; "
                                                f"objective={m.objective} is not supported, use --objective clm")
    require(m.mtp == "none", f"mtp={m.mtp} is not supported by arch={m.arch} (its heads read one stack); use --mtp none")
    require(not any(b.mod for b in m.layers), f"arch={m.arch} with mod=true layers: mixture-of-depths routing is not "
                                             "supported in its stacks; drop --mod")


def refuse_window_schedule(train: Trainconfig, m: LLMconfig) -> None:
    """The window schedule grows one model's windows; these stacks run at lengths of their own."""
    require(train.window_schedule == "none", f"window_schedule={train.window_schedule} is not supported by "
                                             f"arch={m.arch}; set each stack's window in its layer specs")
